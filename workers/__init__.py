"""The worker process: claim work from the queue, batch it, embed it, commit, recover."""
