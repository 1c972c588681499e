"""``encode_chat``: block ids for chat messages and retrieved documents rendered by a chat template.

How the content of each message / document is found in the rendered text (docs/howto-blocks-from-text.md):

1. the template is rendered (``apply_chat_template(..., tokenize=False)``) with each content that needs a span
   replaced by a unique marker (private-use characters no text holds), so its place is found exactly, with no
   string search that could hit the role names or glue (a content ``"user"`` would match ``<|im_start|>user``);
2. the markers are replaced by the real contents, and the result must equal the template rendered with the real
   contents; if the template trims contents (``| trim``), the stripped contents are tried. A template that
   transforms contents otherwise, or renders one twice, raises ``BlockIdsError``;
3. the text is tokenized as ``apply_chat_template(..., tokenize=True)`` does (``add_special_tokens=False``), and
   tokens get the block of the span holding their first non-whitespace character (``text.assign_tokens``).

The tokens equal those of ``apply_chat_template(..., tokenize=True)``; ``add_sink`` is off by default for that
reason (templates write their own BOS). Rendering the prefixes ``messages[:i + 1]`` and diffing lengths was not
chosen: it assumes each prefix renders as a prefix of the whole, which templates that treat the last message
specially (generation prompts, reasoning content) break.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import BatchEncoding

from ..config.localist import LocalistConfig
from ..errors import BlockIdsError
from .text import Span, assign_tokens, block_table, finish, require_fast, resolve_block, sink_token_id, with_sink


def _marker(k: int) -> str:
    return f"\ue000{k}\ue001"


def _message_block(i: int, m: Mapping, block_per: Any, n_docs: int, n_messages: int) -> Any:
    """The block of message ``i`` before name resolution: its "block" key, else what ``block_per`` says."""
    if "block" in m:
        return m["block"]
    if block_per == "auto":
        block_per = "message" if n_docs == 0 else None
    if block_per is None:
        return 0
    if block_per == "message":
        return n_docs + i + 1  # after the documents' blocks 1..n_docs
    if isinstance(block_per, Mapping):
        return block_per.get(m.get("role"), 0)
    if isinstance(block_per, (list, tuple)):
        if len(block_per) != n_messages:
            raise BlockIdsError(f"encode_chat: block_per has {len(block_per)} entries for {n_messages} messages: "
                                "give one block per message")
        return block_per[i]
    raise BlockIdsError(f"encode_chat: block_per={block_per!r} must be 'auto', 'message', None, a mapping role -> "
                        "block, or a list with one block per message")


def _conversation(render: Any, messages: Any, documents: Any, block_per: Any, glue: str, names: dict[str, int],
                  max_blocks: int | None, where: str) -> tuple[str, list[Span], list[str]]:
    """(rendered text, block spans sorted by start, a description per span index) for one conversation."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or \
            not all(isinstance(m, Mapping) for m in messages):
        raise BlockIdsError(f"{where}: messages must be a list of dicts with 'role' and 'content'")
    docs = [] if documents is None else list(documents)
    if not all(isinstance(d, Mapping) for d in docs):
        raise BlockIdsError(f"{where}: documents must be a list of dicts with a 'text' (or 'content') str")
    clean_msgs = [{k: v for k, v in m.items() if k != "block"} for m in messages]
    clean_docs = [{k: v for k, v in d.items() if k != "block"} for d in docs]
    # units: (holder dict, content key, block, description); a document's id defaults to its index + 1.
    units = []
    for j, (d, c) in enumerate(zip(docs, clean_docs)):
        key = "text" if isinstance(c.get("text"), str) else "content"
        if not isinstance(c.get(key), str):
            raise BlockIdsError(f"{where}: document {j} has no 'text' or 'content' str: give it one")
        units.append((c, key, resolve_block(d.get("block", j + 1), names, max_blocks, f"{where}: document {j}"),
                      f"document {j}"))
    for i, (m, c) in enumerate(zip(messages, clean_msgs)):
        block = resolve_block(_message_block(i, m, block_per, len(docs), len(messages)), names, max_blocks,
                              f"{where}: message {i}")
        if not isinstance(c.get("content"), str):
            if block != 0 or glue == "block":
                raise BlockIdsError(f"{where}: message {i} has content of type {type(c.get('content')).__name__}; "
                                    "only str contents can be blocks (and glue='block' needs str contents "
                                    "throughout): make it general (block 0) or give it text")
            continue
        units.append((c, "content", block, f"message {i}"))
    # Contents that need a span: the blocks', and with glue="block" every one (they bound the glue of the next).
    marked = [u for u in units if u[2] >= 1 or glue == "block"]
    real = render(clean_msgs, clean_docs or None)
    contents = [holder[key] for holder, key, _, _ in marked]
    for k, (holder, key, _, _) in enumerate(marked):
        holder[key] = _marker(k)
    text_m = render(clean_msgs, clean_docs or None)
    found = []
    for k, ((_, _, block, what), content) in enumerate(zip(marked, contents)):
        count = text_m.count(_marker(k))
        if count != 1:
            raise BlockIdsError(f"{where}: the chat template renders the content of {what} {count} times, not once: "
                                "it cannot be a block of its own; build the spans yourself (block_ids_from_spans)")
        found.append((text_m.index(_marker(k)), k, block, content))
    found.sort()
    for strip in (False, True):
        pieces, spans, cur, length = [], [], 0, 0
        for pos, k, block, content in found:
            content = content.strip() if strip else content
            pieces.append(text_m[cur:pos])
            length += pos - cur
            spans.append((length, length + len(content), block, k))
            pieces.append(content)
            length += len(content)
            cur = pos + len(_marker(k))
        pieces.append(text_m[cur:])
        if "".join(pieces) == real:
            break
    else:
        raise BlockIdsError(f"{where}: the chat template changes the contents it renders (beyond trimming), so "
                            "their places in the text cannot be found: render the text yourself and pass character "
                            "spans to block_ids_from_spans")
    if glue == "block":
        # Each block takes the glue before it (its header, the previous turn's end): general tokens between blocks
        # would see the earlier block at every layer and carry it into the later one.
        spans = [(spans[n - 1][1] if n and b >= 1 else s, e, b, k) for n, (s, e, b, k) in enumerate(spans)]
    descriptions = [m[3] for m in marked]
    return real, [s for s in spans if s[2] >= 1], descriptions


def encode_chat(tokenizer: Any, messages: Sequence, *, block_per: Any = "auto", documents: Sequence | None = None,
                glue: str = "general", block_names: Sequence[str] | Mapping[str, int] | None = None,
                config: LocalistConfig | None = None, chat_template: str | None = None,
                add_generation_prompt: bool = False, add_sink: bool | int = False, padding: bool | str = True,
                max_length: int | None = None, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                return_tensors: str | None = "pt", **template_kwargs: Any) -> BatchEncoding:
    """``input_ids``, ``attention_mask`` and ``block_ids`` for a conversation (or a list of conversations).

    Blocks: a message or document with a ``"block"`` key (an id or a name) gets that block; ``documents=`` (passed
    to the template, e.g. for RAG) get blocks 1, 2, ... in order. Other messages follow ``block_per``: ``"message"``
    gives message ``i`` block ``i + 1`` (``len(documents) + i + 1`` with documents), ``None`` block 0, a mapping
    role -> block (missing roles 0), or a list with one block per message; ``"auto"`` (default) is ``"message"``
    without documents and ``None`` with them. Only contents are block tokens; the template's glue (role headers,
    end-of-turn tokens, the generation prompt) is general with ``glue="general"``; ``glue="block"`` gives each
    block the glue before it, back to the previous content, so that no general token sits between two blocks.
    ``"block"`` keys are removed before rendering. Other keyword arguments (``tools``, ``continue_final_message``,
    template variables) go to ``apply_chat_template``. Needs a fast tokenizer and a chat template.
    """
    if glue not in ("general", "block"):
        raise BlockIdsError(f"encode_chat: glue={glue!r} must be 'general' or 'block'")
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise BlockIdsError(f"encode_chat: {type(tokenizer).__name__} has no apply_chat_template; pass a transformers "
                            "tokenizer")
    try:
        tokenizer.get_chat_template(chat_template, template_kwargs.get("tools"))
    except ValueError as e:
        raise BlockIdsError(f"encode_chat: the tokenizer has no chat template ({e}); set tokenizer.chat_template to "
                            "a Jinja template or pass chat_template=") from e
    require_fast(tokenizer, "encode_chat")
    batched = bool(messages) and isinstance(messages[0], (list, tuple))
    conversations = list(messages) if batched else [messages]
    doc_lists = [None] * len(conversations) if documents is None else (list(documents) if batched else [documents])
    if len(doc_lists) != len(conversations):
        raise BlockIdsError(f"encode_chat: {len(doc_lists)} document lists for {len(conversations)} conversations: "
                            "give one list (or None) per conversation")
    names, max_blocks = block_table(block_names, config)

    def render(msgs, docs):
        return tokenizer.apply_chat_template(msgs, documents=docs, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)

    parts = [_conversation(render, m, d, block_per, glue, names, max_blocks, f"encode_chat: conversation {j}")
             for j, (m, d) in enumerate(zip(conversations, doc_lists))]
    enc = tokenizer([p[0] for p in parts], add_special_tokens=False, return_offsets_mapping=True)
    sink = sink_token_id(tokenizer, add_sink)
    rows = []
    for j, ((text, spans, what), ids, offsets) in enumerate(zip(parts, enc["input_ids"], enc["offset_mapping"])):
        blocks, counts = assign_tokens(text, offsets, spans)
        for (_, _, block, k), n in zip(spans, counts):
            if n == 0:
                raise BlockIdsError(f"encode_chat: conversation {j}, {what[k]} (block {block}) gives no token: give "
                                    "it text or make it general (block 0)")
        rows.append(with_sink(list(ids), blocks, sink))
    return finish(tokenizer, rows, batched, padding=padding, max_length=max_length,
                  pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, return_tensors=return_tensors)
