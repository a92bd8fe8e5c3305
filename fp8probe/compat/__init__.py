"""Drop-in namespaces that mirror other libraries' import paths and argument names over fp8probe (``compat.bitsandbytes``)."""
