"""Train the digits pipeline as models/digits/build.py does (same data, same seed) and save it for
MLServer's scikit-learn runtime; run by the peers' own Python (it needs only scikit-learn and joblib).

    python tests/peers/sklearn_digits.py OUT.joblib
"""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
import _data  # noqa: E402

if __name__ == "__main__":
    x_train, y_train, _, _ = _data.load_digits_split()
    model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0))
    joblib.dump(model.fit(x_train, y_train), sys.argv[1])
