"""FailCore tools for agent frameworks, each an optional extra.

``failcore.integrations.langchain.tools(session)`` (``failcore[langchain]``),
``failcore.integrations.openai_agents.tools(session)`` (``failcore[openai-agents]``) and
``failcore.integrations.pydantic_ai.tools(session)`` (``failcore[pydantic-ai]``) wrap a
session's registered tools as the framework's own tool objects. Every invocation goes
through ``session.call`` / ``session.acall``: the framework never runs the function
itself. The MCP server is :mod:`failcore.mcp`; OpenTelemetry is :mod:`failcore.otel`.
"""
