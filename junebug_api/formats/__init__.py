"""Wire formats: vumi messages, Junebug JSON and its error envelope, queue names,
message ids, JSON bodies. Knows nothing that runs."""
