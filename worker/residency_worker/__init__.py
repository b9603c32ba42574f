"""residency worker: the torch engine that places, runs, offloads, preempts and resumes models on one node."""
