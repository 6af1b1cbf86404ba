"""The agent: a model, a session and tools over one project (runner.Agent), the protocol the runner, the server and
LangChain share (protocol.py), guided replies (guide.py) and the LangChain chat model (chat_model.py)."""
