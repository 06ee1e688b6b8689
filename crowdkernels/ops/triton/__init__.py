"""The @triton.jit kernels. Importing this package needs Triton; callers check
`crowdkernels._ext.triton_available()` first."""
