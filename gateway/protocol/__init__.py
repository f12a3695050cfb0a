"""The KServe v2 / Triton inference protocol: types, dtypes and codecs."""
