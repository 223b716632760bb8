/* A TensorFlow Lite external delegate that claims no operation: it loads and initialises through the
 * same plugin entry points as libedgetpu.so.1 or an NPU vendor's delegate, and the interpreter then
 * runs every op on the CPU. The option "fail" = "1" makes creation fail, as a delegate whose device is absent does. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  int (*CopyFromBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  int (*CopyToBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  void (*FreeBufferHandle)(void*, struct TfLiteDelegate*, int*);
  int64_t flags;
  void* opaque_delegate_builder;
  void* reserved[8];
} TfLiteDelegate;

static int prepare(void* context, TfLiteDelegate* delegate) { (void)context; (void)delegate; return 0; }

TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n, void (*report)(const char*)) {
  for (size_t i = 0; i < n; i++) {
    if (strcmp(keys[i], "fail") == 0 && strcmp(values[i], "1") == 0) {
      if (report) report("fake delegate: asked to fail");
      return NULL;
    }
  }
  TfLiteDelegate* d = calloc(1, sizeof(TfLiteDelegate));
  d->Prepare = prepare;
  return d;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate* d) { free(d); }
