#pragma once
// The one generated header that the CPU torch wheel leaves out of c10/cuda (cmake writes it when torch
// is built with CUDA; this is its content for a shared-library build). Used only by .ci/run's
// `nvcc -c` compile check; a CUDA torch ships the real file.
#define C10_CUDA_BUILD_SHARED_LIBS
