"""The agent's tools: files (list_dir, read_file, grep, glob, write_file, edit), symbols (definition, references),
shell, and memory (recall, note).

Every path a tool takes is relative to the project root and checked by the sandbox (tools.sandbox); the agent
calls tools only through `run_tool`, which validates arguments, never raises and caps the output. Modules:
base (Tool, ToolContext, ToolError, run_tool), sandbox (resolve, read_text), files (project_files), fs, shell,
memory_tools.
"""

from deltamem.tools import fs, memory_tools, shell, symbols
from deltamem.tools.base import Tool, ToolContext, ToolError, run_tool
from deltamem.tools.files import project_files
from deltamem.tools.sandbox import resolve

__all__ = ["Tool", "ToolContext", "ToolError", "default_tools", "project_files", "resolve", "run_tool"]


def default_tools() -> dict[str, Tool]:
    """Every tool, by name."""
    return {t.name: t for t in (*fs.TOOLS, *symbols.TOOLS, shell.SHELL, *memory_tools.TOOLS)}
