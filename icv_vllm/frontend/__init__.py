"""Front end: runs in the process that accepts requests (vLLM's API server,
or the offline ``LLM``). Parses and admits selections (``admission``), reads
the user's vector directory safely (``vector_files``), pins admitted content
(``pinned_store``) and drives in-server captures (``capture_client``).
Imports no worker module."""
