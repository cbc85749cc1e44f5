"""embedstream: the CLI that starts the pipeline, and the Python client.

    from embedstream import Client, AsyncClient
"""

from embedstream.client import AsyncClient, AsyncJob, Client, Job, Update
from embedstream.protocol import Chunk, EmbedstreamError, Result, ServerUnreachable

__all__ = ["AsyncClient", "AsyncJob", "Chunk", "Client", "EmbedstreamError", "Job",
           "Result", "ServerUnreachable", "Update"]
