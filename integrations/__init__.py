"""diffusers integration of nag-kernels (installed as ``nag_kernels.integrations``)."""
