"""Text embeddings of concepts, anchors and preserved prompts, built exactly as the pipelines build them.

The denoiser reads `encode_prompt`'s output: for each text encoder of the family row (`families.py`) its last or
penultimate hidden state, concatenated (SDXL: both encoders' penultimate states). Closed-form edits use a few
token columns of it, chosen by a token policy:

- "last_subject": the last word token (index len-2), as current UCE;
- "subject": every word token of the concept (so a multi-token name such as "Kelly McKernan" is erased whole,
  not only its last sub-token `ernan`); each goes to the anchor's last word token;
- "eot": the first end-of-text token (index len-1), as TRCE stage 1;
- "tail": from the last word token to the end of the padded sequence, as legacy UCE;
- "all": all positions of the padded sequence, as RECE;
- "aligned": all positions of the padded sequence, each concept position paired with the anchor position it
  stands for: the tokens the two prompts share at the start (a template's "a photo of") and at the end (its
  suffix, the end token) pair one to one, the padding after them pairs in order, and the concept's own tokens go
  to the anchor's (one to one when the counts agree, else each to the anchor's last one, or to the position after
  the shared start when the anchor has none). For a bidirectional encoder (FLUX's T5), where every position
  carries the concept.

T5 has no start token: its last word token is also index len-2 and its end token len-1, so the policies read the
same columns of it; "subject" starts at 0 instead of 1.

A one-token pick that lands on punctuation or a function word ("Van Gogh style" → `style`, "nudity." → `.`)
logs a warning naming the token.

CLIP's text tower is causal, so the columns up to the end-of-text token do not depend on padding: for the first
two policies only the real tokens are encoded. T5 is not: it is always encoded at the full padded length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .families import (
    family_of,
    pooled_pairs,
    sequence_length,
    text_pairs,
    text_readers,
    token_pairs,
    token_segments,
    weights_fingerprint,
)

TOKEN_POLICIES = ("last_subject", "subject", "eot", "tail", "all", "aligned")
# Words a single picked column should not be: it would erase the word, not the concept.
STOP_WORDS = frozenset("a an the of by in on at to with and or for from style art painting photo image picture "
                       "portrait drawing".split())
logger = logging.getLogger(__name__)
_BATCH = 32


def check_token_policy(policy: str) -> None:
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"Unknown token_policy {policy!r}; choose one of {', '.join(TOKEN_POLICIES)}.")


def _converted(pipe, prompts: list[str], tokenizer) -> list[str]:
    # Textual-inversion tokens expand to several vectors, as in encode_prompt.
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return [convert(p, tokenizer) for p in prompts] if convert is not None else list(prompts)


def token_lengths(pipe, prompts: list[str], what: str = "prompt", truncate: bool = False) -> list[int]:
    """Real token counts (with start and end tokens); raises for a prompt that would be truncated, unless
    `truncate` (a caption corpus: then the count is cut to what the encoder reads, as the pipeline would)."""
    tokenizer, _, row = token_pairs(pipe)[0]
    limit = sequence_length(tokenizer, row)
    lengths = [len(ids) for ids in tokenizer(_converted(pipe, prompts, tokenizer), truncation=False)["input_ids"]]
    if truncate:
        return [min(n, limit) for n in lengths]
    for prompt, n in zip(prompts, lengths):
        if n > limit:
            raise ValueError(
                f"The {what} {prompt!r} is {n - 2} tokens long; the text encoder reads at most {limit - 2}. "
                "Shorten it (the pipeline would silently truncate it)."
            )
    return lengths


def _uses_padding(policy: str) -> bool:
    return policy in ("tail", "all", "aligned")


def leading_specials(tokenizer) -> int:
    """1 when the tokenizer puts a start token before the words (CLIP), 0 when it does not (T5)."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])


def encode(pipe, prompts: list[str], *, full_length: bool, lengths: list[int] | None = None,
           grad: bool = False) -> torch.Tensor:
    """(batch, tokens, dim) float32 embeddings as `encode_prompt` makes them; truncated after the longest prompt's
    end token unless `full_length` (`lengths`: the prompts' `token_lengths`, if already known). `grad=True` keeps
    the graph (a trained text encoder)."""
    return torch.cat(encode_segments(pipe, prompts, full_length, lengths, grad), dim=1)


def encode_segments(pipe, prompts: list[str], full_length: bool, lengths: list[int] | None = None,
                    grad: bool = False) -> list:
    """`encode`'s embeddings, one (batch, tokens, dim) tensor per segment of the sequence (SD3: CLIP, then T5; one
    segment elsewhere); a segment of causal encoders is cut after the longest prompt unless `full_length`."""
    with torch.set_grad_enabled(grad):
        return _encode_segments(pipe, prompts, full_length, lengths)


def _encode_segments(pipe, prompts: list[str], full_length: bool, lengths: list[int] | None) -> list:
    segments = token_segments(pipe)
    device = getattr(pipe, "_execution_device", None) or segments[0][0][1].device
    longest = max(lengths or token_lengths(pipe, prompts))
    width = _joint_width(pipe) if _segmented(pipe) else None
    out = []
    for index, pairs in enumerate(segments):
        outputs = []
        for tokenizer, encoder, row in pairs:
            batch = tokenizer(
                _converted(pipe, prompts, tokenizer),
                padding="max_length",
                max_length=sequence_length(tokenizer, row),
                truncation=True,
                return_tensors="pt",
            )
            ids, mask = batch.input_ids, batch.attention_mask
            cut = not full_length and row.causal and index == 0  # later segments: their own lengths
            if cut:  # a bidirectional encoder (T5) reads the padding: always encode it in full
                ids, mask = ids[:, :longest], mask[:, :longest]
            chunks = []
            for start in range(0, len(prompts), _BATCH):
                chunk_ids, chunk_mask = ids[start: start + _BATCH].to(device), mask[start: start + _BATCH].to(device)
                chunks.append(encoder_states(encoder, row, chunk_ids, chunk_mask).float())
            states = torch.cat(chunks)
            outputs.append(states if full_length or index else states[:, :longest])
        states = torch.cat(outputs, dim=-1)
        if width is not None:  # SD3 zero-pads the CLIP features to T5's width (truncating, as it does, if wider)
            states = torch.nn.functional.pad(states, (0, width - states.shape[-1]))
        out.append(states)
    return out


def token_width(pipe) -> int:
    """The width of the token embeddings `encode` gives (SD3: the padded joint width)."""
    if _segmented(pipe):
        return _joint_width(pipe)
    return sum(e.config.hidden_size for _, e, _ in token_pairs(pipe))


def _segmented(pipe) -> bool:
    """Whether the family puts several segments along the sequence, padded to one width (SD3)."""
    return len({t.segment for t in family_of(pipe).text_encoders}) > 1


def _joint_width(pipe) -> int:
    """The width the token pathway's reader takes (SD3: the T5 width the CLIP features are padded to)."""
    return next(iter(text_readers(pipe).values())).in_features


def segment_lengths(pipe, prompts: list[str], lengths: list[int]) -> list[tuple]:
    """`(tokenizer, lengths)` per segment: the first segment's are `lengths`; a later one's (SD3's T5) are its own
    tokenizer's real token counts, cut to its window as the pipeline cuts them."""
    out = []
    for index, pairs in enumerate(token_segments(pipe)):
        tokenizer, _, row = pairs[0]
        if index == 0:
            out.append((tokenizer, list(lengths)))
            continue
        limit = sequence_length(tokenizer, row)
        ids = tokenizer(_converted(pipe, prompts, tokenizer), truncation=False)["input_ids"]
        out.append((tokenizer, [min(len(i), limit) for i in ids]))
    return out


def encoder_states(encoder, row, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states `encode_prompt` takes from `encoder` for token `ids` (the family row says which)."""
    return encoder_outputs(encoder, row, ids, mask)[0]


def encoder_outputs(encoder, row, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """(`encoder_states`, the pooled vector where the denoiser reads this encoder's, else None) from one pass."""
    penultimate = row.hidden == "penultimate"
    use_mask = not penultimate and getattr(encoder.config, "use_attention_mask", False)
    out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out[0]
    return states, pooled_output(out) if row.role in ("pooled", "both") else None


def pooled_output(out) -> torch.Tensor:
    """The pooled text vector of a CLIP output: the projection's `text_embeds` (SDXL's second encoder), else
    `pooler_output`."""
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def same_vocabulary(pairs) -> bool:
    """Whether the (tokenizer, encoder, row) pairs share one vocabulary and concatenate their features (SD 1.x/2.x,
    SDXL), so one token id can enter every encoder."""
    return all(p[2].segment == pairs[0][2].segment and p[0].get_vocab() == pairs[0][0].get_vocab()
               for p in pairs[1:])


def encode_pooled(pipe, prompts: list[str]) -> torch.Tensor:
    """(batch, dim) float32 pooled text vectors as the MMDiT pipelines make them (FLUX: CLIP's `pooler_output`),
    the denoiser's second text input."""
    device = getattr(pipe, "_execution_device", None)
    outputs = []
    with torch.no_grad():
        for tokenizer, encoder, _ in pooled_pairs(pipe):
            ids = tokenizer(_converted(pipe, prompts, tokenizer), padding="max_length",
                            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            chunks = []
            for start in range(0, len(prompts), _BATCH):
                out = encoder(ids[start: start + _BATCH].to(device or encoder.device), output_hidden_states=False)
                chunks.append(pooled_output(out).float())
            outputs.append(torch.cat(chunks))
    return torch.cat(outputs, dim=-1)


def policy_columns(embedding: torch.Tensor, length: int, policy: str, count: int | None = None,
                   lead: int = 1) -> torch.Tensor:
    """Token columns of one prompt's (tokens, dim) embedding under `policy`, as (n, dim); `length` counts the
    prompt's tokens with its start (`lead`: 1 for CLIP, 0 for T5) and end tokens."""
    last = max(length - 2, 0)  # T5's "" is its end token alone: its one column stands for the empty prompt
    if policy == "last_subject":
        return embedding[last : last + 1]
    if policy == "subject":
        return embedding[lead : length - 1]
    if policy == "eot":
        return embedding[length - 1 : length]
    if policy == "tail":
        start = last
        return embedding[start : start + count] if count else embedding[start:]
    return embedding


def concept_anchor_columns(pipe, concepts: list[str], anchors: list[str], policy: str, subjects=None):
    """Aligned token columns (n, dim) of the concepts (to erase) and of their anchors (targets).

    Under "tail" a concept and its anchor are cut to the same number of columns, as legacy UCE does. Under
    "subject", `subjects[i]` is the concept word(s) inside prompt `concepts[i]` (a template such as "painting by
    {}"; default: the prompt itself), whose tokens are the columns.
    """
    return columns_by_policy(pipe, concepts, anchors, (policy,), subjects)[policy]


def columns_by_policy(pipe, concepts: list[str], anchors: list[str], policies, subjects=None) -> dict:
    """`{policy: (erase, target)}` as `concept_anchor_columns` gives them, from one encoding of the prompts
    (padded when any policy reads padding; the text tower is causal, so the other policies' columns are the
    same)."""
    for policy in policies:
        check_token_policy(policy)
    lengths_c = token_lengths(pipe, concepts, "concept")
    lengths_a = token_lengths(pipe, anchors, "anchor")
    unique = list(dict.fromkeys(concepts + anchors))
    known = dict(zip(concepts + anchors, lengths_c + lengths_a))
    segments = encode_segments(pipe, unique, any(_uses_padding(p) for p in policies), [known[p] for p in unique])
    if any(p in ("last_subject", "tail") for p in policies):
        warn_weak_picks(pipe, concepts, lengths_c)
    if "last_subject" in policies:
        warn_shared_subject(pipe, subjects or concepts)
    out = {}
    # Each segment of the sequence (SD3: CLIP, then T5) gets the policy with its own tokenizer and lengths.
    for embeddings, (tokenizer, lengths) in zip(segments, segment_lengths(pipe, unique, [known[p] for p in unique])):
        rows = {p: embeddings[i] for i, p in enumerate(unique)}
        count = dict(zip(unique, lengths))
        pairs = [(c, a, count[c], count[a]) for c, a in zip(concepts, anchors)]
        for policy in dict.fromkeys(policies):
            erase, target = _aligned_columns(pipe, tokenizer, rows, pairs, policy, subjects or concepts)
            if policy in out:
                erase, target = torch.cat([out[policy][0], erase]), torch.cat([out[policy][1], target])
            out[policy] = (erase, target)
    return out


def aligned_positions(concept_ids: list[int], anchor_ids: list[int], total: int) -> tuple[list[int], list[int]]:
    """(concept positions, anchor positions) paired under the "aligned" policy (module docstring), for two
    prompts' real token ids (start and end tokens included) padded to `total` positions."""
    n_c, n_a = len(concept_ids), len(anchor_ids)
    start = 0
    while start < min(n_c, n_a) and concept_ids[start] == anchor_ids[start]:
        start += 1
    end = 0
    while end < min(n_c, n_a) - start and concept_ids[n_c - 1 - end] == anchor_ids[n_a - 1 - end]:
        end += 1
    mid_c, mid_a = n_c - end - start, n_a - end - start
    c_pos, a_pos = list(range(start)), list(range(start))
    for j in range(mid_c):
        c_pos.append(start + j)
        a_pos.append(start + j if mid_c == mid_a else start + mid_a - 1 if mid_a else start)
    after = min(total - (n_c - end), total - (n_a - end))  # the shared end, then the padding, in order
    c_pos += range(n_c - end, n_c - end + after)
    a_pos += range(n_a - end, n_a - end + after)
    return c_pos, a_pos


def _aligned_columns(pipe, tokenizer, rows: dict, pairs: list, policy: str, subjects: list[str]):
    total = next(iter(rows.values())).shape[0]
    spans = subject_spans(pipe, [c for c, *_ in pairs], subjects, tokenizer) if policy == "subject" else None
    if policy == "aligned":
        ids = dict(zip(rows, tokenizer(_converted(pipe, list(rows), tokenizer))["input_ids"]))
    erase, target = [], []
    for i, (concept, anchor, n_c, n_a) in enumerate(pairs):
        if policy == "aligned":
            c_pos, a_pos = aligned_positions(ids[concept][:n_c], ids[anchor][:n_a], total)
            erase.append(rows[concept][c_pos])
            target.append(rows[anchor][a_pos])
            continue
        if policy == "subject":  # every token of the concept words goes where the anchor's last word goes
            columns = rows[concept][spans[i][0]: spans[i][1]]
            erase.append(columns)
            target.append(policy_columns(rows[anchor], n_a, "last_subject").expand(len(columns), -1))
            continue
        count = total - max(n_c, n_a) + 2 if policy == "tail" else None
        erase.append(policy_columns(rows[concept], n_c, policy, count))
        target.append(policy_columns(rows[anchor], n_a, policy, count))
    return torch.cat(erase), torch.cat(target)


def subject_spans(pipe, prompts: list[str], subjects: list[str], tokenizer=None) -> list[tuple[int, int]]:
    """(start, end) token positions of each subject's word tokens inside its prompt (`tokenizer`: default, the
    token pathway's first); raises when a subject's tokens do not appear in the prompt as they are (a template
    that changes how the words tokenize)."""
    tokenizer = tokenizer or token_pairs(pipe)[0][0]
    lead = leading_specials(tokenizer)
    prompt_ids = tokenizer(_converted(pipe, prompts, tokenizer))["input_ids"]
    subject_ids = tokenizer(_converted(pipe, subjects, tokenizer))["input_ids"]
    spans = []
    for prompt, subject, ids, sub in zip(prompts, subjects, prompt_ids, subject_ids):
        words = sub[lead:-1]
        found = next((i for i in range(lead, len(ids) - len(words)) if ids[i: i + len(words)] == words), None)
        if not words or found is None:
            raise ValueError(f"token_policy='subject': the tokens of {subject!r} do not appear in the prompt "
                             f"{prompt!r} it is read from; use a template that keeps the concept's words as they "
                             "are, or another token_policy.")
        spans.append((found, found + len(words)))
    return spans


def warn_weak_picks(pipe, concepts: list[str], lengths: list[int]) -> None:
    """Log when a concept's last word token (the one column "last_subject" erases) is punctuation or a function
    word: then that token, not the concept, is what gets erased."""
    tokenizer = token_pairs(pipe)[0][0]
    for concept, ids in zip(concepts, tokenizer(_converted(pipe, concepts, tokenizer))["input_ids"]):
        if len(ids) < 2 + leading_specials(tokenizer):
            continue
        token = _token_text(tokenizer, ids[-2])
        if not any(ch.isalnum() for ch in token) or token.lower() in STOP_WORDS:
            logger.warning("The last token of concept %r is %r, so that is what token_policy 'last_subject' erases; "
                           "drop it from the concept or use token_policy='subject'.", concept, token)


def warn_shared_subject(pipe, concepts: list[str]) -> None:
    """Log when several distinct concepts all end in the same word token: "last_subject" edits that one column of
    each, which then differ only by the words before it, so the edit cannot tell the concepts apart."""
    concepts = list(dict.fromkeys(c for c in concepts if c.strip()))
    if len(concepts) < 2:
        return
    tokenizer = token_pairs(pipe)[0][0]
    ids = tokenizer(_converted(pipe, concepts, tokenizer))["input_ids"]
    last = {row[-2] if len(row) >= 2 + leading_specials(tokenizer) else None for row in ids}
    if len(last) == 1 and None not in last:
        token = _token_text(tokenizer, last.pop())
        logger.warning("The concepts %s all end in the token %r, the one column token_policy 'last_subject' edits, so "
                       "the edit cannot tell them apart; erase them as one concept or use token_policy='subject'.",
                       ", ".join(repr(c) for c in concepts), token)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(token_id).replace("</w>", "").replace("▁", "").strip()


def prompt_columns(pipe, prompts: list[str], policy: str, what: str = "prompt", lengths=None) -> torch.Tensor:
    """Token columns (n, dim) of each prompt under `policy`, concatenated ("aligned" reads every position, as
    "all": a preserved prompt is paired with itself); "pooled": each prompt's pooled vector (MMDiT)."""
    if policy == "pooled":
        return encode_pooled(pipe, prompts)
    check_token_policy(policy)
    lengths = lengths or token_lengths(pipe, prompts, what)
    segments = encode_segments(pipe, prompts, _uses_padding(policy), lengths)
    columns = []
    for embeddings, (tokenizer, counts) in zip(segments, segment_lengths(pipe, prompts, lengths)):
        lead = leading_specials(tokenizer) if policy == "subject" else 1
        columns += [policy_columns(e, n, "all" if policy == "aligned" else policy, lead=lead)
                    for e, n in zip(embeddings, counts)]
    return torch.cat(columns)


def cache_dir() -> Path | None:
    """Where preservation statistics are cached: $DIFFUSERS_ERASE_CACHE ('off' disables), else the HF cache."""
    value = os.environ.get("DIFFUSERS_ERASE_CACHE")
    if value is not None:
        return None if value.lower() in ("", "0", "off", "false", "none") else Path(value)
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "diffusers_erase" / "preserve"


def _cached_statistics(path: Path, dim: int) -> tuple[torch.Tensor, int] | None:
    """A cache file's (gram, count) if it is exactly what `preserve_statistics` writes for this width."""
    try:
        cached = load_file(str(path))
        gram, count = cached["gram"], cached["count"]
    except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
        return None
    if (gram.dtype != torch.float64 or tuple(gram.shape) != (dim, dim) or not torch.isfinite(gram).all()
            or count.numel() != 1 or count.is_floating_point() or int(count.item()) < 0):
        return None
    return gram, int(count.item())


def statistics_key(pipe, prompts: list[str], policy: str) -> str:
    """What preservation statistics depend on: the text encoders' weights and settings, the policy, the prompts."""
    encoders = [
        [weights_fingerprint(e), tok.pad_token, sequence_length(tok, row),
         getattr(e.config, "use_attention_mask", False), row.hidden] + ([row.role] if row.role != "tokens" else [])
        for tok, e, row in text_pairs(pipe)  # (the SD keys are unchanged since the pooled role was added)
    ]
    return hashlib.sha256(json.dumps([encoders, policy, list(prompts)]).encode()).hexdigest()[:32]


def preserve_statistics(pipe, prompts: list[str], policy: str, truncate: bool = False) -> tuple[torch.Tensor, int]:
    """Σ c cᵀ over the token columns of the preserved prompts (dim × dim, float64) and the number of columns.

    float64, because with a small λ the solve needs this sum to stay positive semi-definite beyond float32
    round-off.

    This is all a closed-form edit needs from the preserve set, so it is cached on disk, keyed by the text
    encoders' weights, the token policy and the prompts: a second erase with the same set skips the encoding.
    `truncate` reads prompts longer than the encoder's window cut to it (a caption corpus) instead of refusing
    them.
    """
    if policy != "pooled":
        check_token_policy(policy)
    pairs = pooled_pairs(pipe) if policy == "pooled" else token_pairs(pipe)
    key = statistics_key(pipe, prompts, policy)
    folder = cache_dir()
    path = folder / f"{key}.safetensors" if folder else None
    dim = sum(_pooled_width(e) for _, e, _ in pairs) if policy == "pooled" else token_width(pipe)
    if path is not None and path.exists():
        cached = _cached_statistics(path, dim)
        if cached is not None:
            return cached
        path.unlink(missing_ok=True)  # damaged or foreign: recomputed, never trusted

    # fails before any encoding work (the pooled encoders read at most their own window, truncating as the
    # pipelines do)
    lengths = token_lengths(pipe, prompts, "preserved prompt", truncate) if policy != "pooled" else [0] * len(prompts)
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    chunks = range(0, len(prompts), _BATCH)
    with pipe.progress_bar(total=len(chunks)) if len(chunks) > 1 else contextlib.nullcontext() as bar:
        for start in chunks:
            chunk = slice(start, start + _BATCH)
            columns = prompt_columns(pipe, prompts[chunk], policy, lengths=lengths[chunk]).cpu().double()
            gram += columns.T @ columns
            count += columns.shape[0]
            if bar is not None:
                bar.update()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        save_file({"gram": gram, "count": torch.tensor(count)}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return gram, count



def _pooled_width(encoder) -> int:
    return getattr(encoder.config, "projection_dim", None) if hasattr(encoder, "text_projection") else \
        encoder.config.hidden_size


# ------------------------------------------------------------------------------------------ the SPM gate terms


def special_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def token_sets(pipe, prompts: list[str]) -> list[set[int]]:
    """T(p): each prompt's token ids without start, end and padding tokens (first tokenizer)."""
    tokenizer = token_pairs(pipe)[0][0]
    special = special_ids(tokenizer)
    return [set(ids) - special for ids in tokenizer(list(prompts), truncation=True)["input_ids"]]


def token_overlap(prompt_tokens: set[int], erased_tokens: set[int]) -> float:
    """|T(p) ∩ T(e)| / |T(e)|: the share of the erased prompt's tokens that the prompt contains."""
    return len(prompt_tokens & erased_tokens) / len(erased_tokens) if erased_tokens else 0.0


def gate_value(cosine: float, overlap: float) -> float:
    """SPM facilitated transport for one (prompt, erased prompt) pair: max(cos, token overlap), clamped to [0, 1]."""
    return min(1.0, max(0.0, cosine, overlap))


# The reference's prompt templates (UCE `uce_sd_erase.py`, `--expand_prompts`): the concept and its anchor are
# expanded in parallel.
TEMPLATES = {
    "art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
}


def expand_prompts(concepts: list[str], anchors: list[str], templates: str):
    """Each concept bare and inside every template of the set, its anchor likewise, in parallel: (prompts,
    anchors, subjects), `subjects[i]` the concept inside `prompts[i]`."""
    if templates not in TEMPLATES:
        raise ValueError(f"Unknown template set {templates!r}; choose one of {', '.join(TEMPLATES)}.")
    out_c, out_a, subjects = [], [], []
    for concept, anchor in zip(concepts, anchors):
        out_c += [concept] + [t.format(concept) for t in TEMPLATES[templates]]
        out_a += [anchor] + [t.format(anchor).strip() for t in TEMPLATES[templates]]
        subjects += [concept] * (1 + len(TEMPLATES[templates]))
    return out_c, out_a, subjects
