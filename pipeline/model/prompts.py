"""Prompts: the prefix a job's texts get before the model sees them.

A job names a literal `prompt`, or a `prompt_name` from the model's
sentence-transformers `prompts` configuration, or neither (then the model's
`default_prompt_name` applies, as in `SentenceTransformer.encode`). The
prompt is resolved once, when the job is created, and stored in the job
record: every worker then prepends the same string, and the text the
embedder sees (and any cache keyed on it) includes the prompt. Because the
worker counts the tokens of `prompt + text`, the prompt counts in usage and
in truncation, as it does for the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import InvalidInput

if TYPE_CHECKING:
    from pipeline.inputs import JobOptions
    from pipeline.model.info import ModelInfo


def resolve_prompt(options: JobOptions, model: ModelInfo) -> str:
    """The prefix for this job's texts ("" for none); 422 for a prompt_name the model lacks."""
    if options.prompt is not None:
        return options.prompt
    if options.prompt_name is not None:
        if options.prompt_name not in model.prompts:
            known = ", ".join(repr(name) for name in sorted(model.prompts))
            has = f"has the prompts {known}" if known else "has no prompts"
            raise InvalidInput(f"unknown prompt_name {options.prompt_name!r}: {model.name} "
                               f"{has}; or pass a literal 'prompt'",
                               prompts=sorted(model.prompts))
        return model.prompts[options.prompt_name]
    if model.default_prompt_name:
        return model.prompts.get(model.default_prompt_name, "")
    return ""


def with_prompt(prompt: str, texts: list[str]) -> list[str]:
    """The texts as the model sees them."""
    return [prompt + text for text in texts] if prompt else texts
