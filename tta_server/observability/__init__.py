"""Following one request: its id in every answer and log line, JSON logs, optional OpenTelemetry spans.

Nothing here imports the app, the API or torch, so every layer may use it: the id and the
current span travel in context variables, which the batcher and the store pool carry into
their threads explicitly (a thread pool does not do it by itself).
"""
