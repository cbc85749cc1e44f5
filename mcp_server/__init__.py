"""The Starlette app: REST, SSE, MCP tools, the dashboard, probes and metrics."""
