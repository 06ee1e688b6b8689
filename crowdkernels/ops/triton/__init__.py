"""The @triton.jit kernels and their Triton ops. Importing this package's modules needs Triton: the op modules
import them under `except ImportError`, and `crowdkernels._ext.backend` sends tensors to them only where
Triton runs."""
