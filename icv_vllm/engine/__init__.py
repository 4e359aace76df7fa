"""Engine core side: runs in the process that owns vLLM's scheduler.
Loads admitted (pinned) vectors, keeps the distinct vectors of running
requests within a fixed bank's size, and ships vector contents to the
workers with the steps that need them (``vector_scheduling``)."""
