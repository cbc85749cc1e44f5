"""What the MCP tools tell an agent: when to use each, its limits, what it returns.

Kept apart from the code because they are prose for a model to read; the
`{placeholders}` are filled from the settings when the tools are registered.
"""

INSTRUCTIONS = """\
embedstream turns texts into embedding vectors with a sentence-transformers model, through a \
queue served by worker processes.

Pick the tool by size and purpose:
- compare a query with up to a few hundred texts: `similarity` (scores only, no vectors);
- vectors for up to a few hundred texts, now: `embed`;
- a larger collection, or one you want to search: `submit_job`, then poll `job_status` until \
it is completed, then `search_job` (semantic search) or `job_results` (vectors, page by page);
- stop a job: `cancel_job`;
- which models are served (sizes, token limits, prompts): `list_models`.
Every tool that embeds takes `model` (one that list_models shows), `prompt` or `prompt_name` \
(instruction models want e.g. "query: " for queries), and `chunk: true` to embed texts longer \
than the model's token limit whole instead of truncating them.
Each job is also the resource embedstream://jobs/{job_id} (its status as JSON). Vectors are \
large: ask for encoding "base64" and small pages unless you need the numbers themselves."""

DESCRIPTIONS = {
    "embed": """\
Embed up to {max_texts} texts and return their vectors in this reply; it waits for a worker \
and reports progress while it does.
Use it for a handful of queries or passages whose vectors you need now. For more than \
{max_texts} texts, or a collection you will search later, use submit_job. To compare texts, \
use similarity instead: it returns scores, not vectors.
Returns {{model, dimensions, embeddings (one per input, in input order), truncated (indexes \
of inputs cut at the model's token limit), chunks (with chunk=true: windows per input)}}. A \
float vector is several KB of JSON; encoding "base64" (little-endian float32) is about half \
that, "float16" (little-endian half floats) or "int8" a quarter, "ubinary" (sign bits) a \
thirty-second.""",
    "similarity": """\
Rank candidate texts by cosine similarity to a query, best first.
Use it to find which of up to {max_texts} texts (query included) are closest in meaning to a \
query; no vectors enter your context. For a larger collection, embed it once with submit_job \
and query it with search_job.
Returns {{matches: [{{text, index, score}}]}}: every candidate, best first; index is its \
position in candidates and score is the cosine similarity (-1 to 1).""",
    "submit_job": """\
Start a bulk embedding job and return at once, without waiting for the vectors.
Use it for more than {max_texts} texts, or for a collection you will search (search_job) or \
read back (job_results). Inputs are strings or {{id, text, metadata}} objects, up to \
{max_inputs} per job; over HTTP one call carries at most about 16 MB of arguments.
Then poll job_status every few seconds until status is "completed" (or watch the resource \
embedstream://jobs/{{job_id}}). With idempotency_key, a retry returns the job the first call \
created instead of starting another.
Returns {{job_id, total, status, resource}}.""",
    "job_status": """\
A job's status and progress.
Use it after submit_job, every few seconds, until status is "completed" (or "failed" / \
"cancelled"); job_results and search_job need the job_id it reports on.
Returns {{id, status (queued | running | completed | failed | cancelled), total, done, failed, \
model, dimensions, created_at, started_at, finished_at, error, backend}}; done/total is the \
progress; backend is what embedded it.""",
    "job_results": """\
One page of a job's results (its vectors), in input order.
Use it when you need the vectors themselves; to find relevant inputs, search_job is far \
cheaper. Start without a cursor and pass each next_cursor back until it is null. Works while \
the job runs: a page then ends at the first result not made yet. limit is 1 to {page_max} \
(default {page_default}); prefer encoding "base64" and small pages to keep your context small.
Returns {{results: [{{index, id, embedding, truncated, error}}], next_cursor, backend}}; \
embedding is null for an input that failed, with the reason in error.""",
    "search_job": """\
Semantic search over a completed job: the top_k of its inputs nearest in meaning to a query \
text, best first.
Use it after submit_job once job_status says "completed"; a job still running is refused \
(poll job_status first). top_k is 1 to {top_k_max} (default 10).
Returns {{matches: [{{index, score, text, id, metadata}}]}}; score is the cosine similarity \
and id/metadata are what you submitted.""",
    "list_models": """\
The models that live workers serve now; any of them can be passed as `model` to the other tools.
Returns {{object: "list", data: [{{id, dimensions, max_tokens, backend, backend_reason, \
prompts}}]}}; prompts maps each prompt_name to the prefix it puts before texts.""",
    "cancel_job": """\
Cancel a queued or running job: inputs not yet embedded are skipped, results already made \
stay readable with job_results. A finished job is left as it is.
Returns the job's status afterwards (as job_status does).""",
}
