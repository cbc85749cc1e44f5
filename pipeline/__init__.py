"""embedstream's core: the pipeline a server, a worker or a tool builds on.

The public surface is what this package and its rooms name in `__all__`;
`workers`, `mcp_server` and `embedstream` import nothing else. The rooms, each
importing only from the ground and the rooms before it:

    pipeline/            the ground: settings, errors, keys, tasks, inputs
    pipeline/model/      what a model is and how it runs
    pipeline/store/      Redis: connections, the embedded server, fan-out, feed, stats
    pipeline/jobs/       a job's life: record, scripts, submission, results, events
    pipeline/service.py  `Pipeline`, the facade the servers call
"""

from pipeline import tracing
from pipeline.errors import (
    InvalidInput,
    InvalidJobId,
    InvalidRequest,
    JobNotFound,
    NotFound,
    PayloadTooLarge,
    PipelineError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from pipeline.inputs import (
    DEFAULT_CHUNK_OVERLAP,
    Item,
    JobOptions,
    parse_item,
    parse_options,
    parse_query_options,
)
from pipeline.jobs.interactive import ProgressCallback
from pipeline.keys import GROUP, Keys, QueueLayout
from pipeline.service import Pipeline
from pipeline.settings import PREFIX, Settings
from pipeline.tasks import Backoff, cancel_and_wait, honour_cancel

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "GROUP",
    "PREFIX",
    "Backoff",
    "InvalidInput",
    "InvalidJobId",
    "InvalidRequest",
    "Item",
    "JobNotFound",
    "JobOptions",
    "Keys",
    "NotFound",
    "PayloadTooLarge",
    "Pipeline",
    "PipelineError",
    "ProgressCallback",
    "QueueLayout",
    "Settings",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "cancel_and_wait",
    "honour_cancel",
    "parse_item",
    "parse_options",
    "parse_query_options",
    "tracing",
]
