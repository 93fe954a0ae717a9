"""The request path behind the HTTP edge: decoding, batching, running adapters, drift."""
