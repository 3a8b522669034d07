"""SICSRec stage 1 (a): positive item pairs, one per user.

For each user the *target* is the last item of the user's training part (leave-one-out: the
last two items of every sequence are the validation and test targets and are never looked
at), and the *candidates* are the earlier training items. A miner picks the candidate most
similar to the target:

* ``cooccurrence`` -- no LLM: cosine similarity of the items' feature-store vectors (text
  embeddings by default) among the items that co-occur in the user's training prefix;
* ``llm`` -- any ``transformers`` causal LM (hub name or local folder) is asked, with the
  candidates' ids and titles correctly aligned, which candidate is most similar; answers are
  parsed robustly, generation is batched, and finished chunks of users are saved atomically
  so an interrupted run resumes where it stopped.

The official code (``llm_driven_sample.py``) used the last item of the *full* sequence (the
test item) as the target and zipped chronologically ordered ids with id-sorted titles; both are
reachable through ``pair_target: full_last`` and ``pair_prompt_aligned: false``.

The last section, :func:`stage1_pairs`, is what stage 1 calls: the pairs of a dataset as its
``pair_*`` settings ask for them (a ready-made ``pair_file``, or one of the miners above), written
next to the data for inspection.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from recbole_mm.features import sha256_strings
from recbole_mm.model.sicsrec._runtime import _all_gather_object, _barrier, _free_memory
from recbole_mm.model.sicsrec.settings import base_feature_names, setting
from recbole_mm.utils import dist_rank_world as _dist_info

logger = logging.getLogger(__name__)

PAIR_TARGETS = ("train_last", "full_last")
ANSWER_STATUSES = ("ok", "title", "none", "illegal")
PAIR_MINERS = ("cooccurrence", "llm")


@dataclass
class UserSequence:
    """One user's chronological item sequence (RecBole internal item ids).

    ``items[:n_train]`` is the training part; ``items[n_train:]`` are the validation and test
    targets (leave-one-out).
    """

    user: str
    items: list
    n_train: int


# ============================================================================ sequences




def user_sequences(dataset) -> list:
    """Per-user chronological sequences of a RecBole ``SequentialDataset`` *before* ``build()``.

    At that point RecBole has filtered and remapped the interactions (``inter_feat`` is still a
    DataFrame). The split is RecBole's leave-one-out (``LS: valid_and_test``): after a stable
    sort by user and time, the last two items of each sequence are the validation and test
    targets and the rest is the training part. With ``benchmark_filename`` (separate
    train/valid/test files) the training part is the first training row's history followed by
    every training row's target, then the validation and test targets.

    The training part is what training reads: without the interactions with held-out (cold) items
    and those ``sparsity_keep`` drops (:func:`training_as_built`).
    """
    config = dataset.config
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    id2user = dataset.field2id_token[uid_field]
    inter = dataset.inter_feat
    if not hasattr(inter, "sort_values"):
        raise TypeError("user_sequences needs the dataset before build() (inter_feat still a DataFrame)")
    out = []
    if config["benchmark_filename"] is not None:
        list_field = iid_field + config["LIST_SUFFIX"]
        sizes = list(dataset.file_size_list)
        if len(sizes) != 3:
            raise ValueError("SICSRec stage 1 expects benchmark_filename with three parts [train, valid, test]")
        part = np.repeat(np.arange(3), sizes)
        frame = inter[[uid_field, iid_field, list_field]].copy()
        frame["_part"] = part
        frame["_len"] = [len(h) for h in frame[list_field]]
        frame = frame.sort_values([uid_field, "_part", "_len"], kind="mergesort")
        for u, g in frame.groupby(uid_field, sort=True):
            train = g[g["_part"] == 0]
            later = [int(x) for x in g.loc[g["_part"] > 0, iid_field]]
            if len(train):
                seq = [int(x) for x in train[list_field].iloc[0] if int(x) > 0] + [int(x) for x in train[iid_field]]
            else:
                valid = g[g["_part"] == 1]
                if not len(valid):
                    continue
                seq = [int(x) for x in valid[list_field].iloc[0] if int(x) > 0]
            out.append(UserSequence(str(id2user[u]), seq + later, len(seq)))
        return training_as_built(dataset, out)
    split = (config["eval_args"] or {}).get("split") or {}
    if split.get("LS") not in ("valid_and_test", [1, 1]):
        logger.warning("SICSRec stage 1 assumes leave-one-out (eval_args.split: {LS: valid_and_test}); "
                       "got %r: the last two items of each sequence are still treated as valid/test", split)
    time_field = dataset.time_field
    keys = [uid_field] + ([time_field] if time_field in inter.columns else [])
    frame = inter.sort_values(keys, kind="mergesort")
    for u, items in frame.groupby(uid_field, sort=True)[iid_field]:
        seq = [int(x) for x in items]
        out.append(UserSequence(str(id2user[u]), seq, max(0, len(seq) - 2)))
    return training_as_built(dataset, out)


def training_as_built(dataset, seqs):
    """``seqs`` with each training part cut to what training reads (:mod:`recbole_mm.data.cold`,
    :mod:`recbole_mm.data.sparsity`): the interactions with held-out (cold) items removed, then only
    the most recent ones ``sparsity_keep`` keeps, as in ``build()``. Validation and test targets stay."""
    from recbole_mm.data.cold import cold_item_mask
    from recbole_mm.data.sparsity import kept_interactions, sparsity_settings, user_draws

    cold = cold_item_mask(dataset)
    keep, mode, seed = sparsity_settings(dataset.config)
    if cold is None and keep >= 1.0:
        return seqs
    if cold is not None and setting(dataset.config, "pair_target") != "train_last":
        raise ValueError("pair_target: full_last mines pairs from the validation and test targets, cold items "
                         "included: a held-out item's interactions would reach stage 1. Use pair_target: "
                         "train_last with cold_items / cold_items_after")
    trains = [[x for x in s.items[:s.n_train] if cold is None or not cold[x]] for s in seqs]
    if keep < 1.0:
        token2id = dataset.field2token_id[dataset.uid_field]
        users = np.asarray([token2id[s.user] for s in seqs], dtype=np.int64)
        k = kept_interactions(users, [len(t) for t in trains], keep, mode, user_draws(dataset.user_num, seed))
        trains = [t[len(t) - int(n):] for t, n in zip(trains, k)]
    return [UserSequence(s.user, t + list(s.items[s.n_train:]), len(t)) for s, t in zip(seqs, trains)]


def pair_query(seq: UserSequence, pair_target="train_last", drop_self=True, max_candidates=50):
    """``(target, candidates)`` (internal ids) of one user, or None when there is no candidate.

    ``train_last``: target = last training item, candidates = the earlier training items.
    ``full_last`` (the official code): target = last item of the whole sequence (the test item),
    candidates = every earlier item (validation item included).
    Candidates keep chronological order, each item once (its latest occurrence), at most the
    ``max_candidates`` most recent ones.
    """
    if pair_target not in PAIR_TARGETS:
        raise ValueError(f"pair_target must be one of {PAIR_TARGETS}, got {pair_target!r}")
    items = seq.items[: seq.n_train] if pair_target == "train_last" else seq.items
    if len(items) < 2:
        return None
    target, history = items[-1], items[:-1]
    seen, cands = set(), []
    for item in reversed(history):
        if item in seen or item == 0 or (drop_self and item == target):
            continue
        seen.add(item)
        cands.append(item)
    cands.reverse()
    if max_candidates:
        cands = cands[-int(max_candidates):]
    if not cands:
        return None
    return target, cands


# ============================================================================ cooccurrence miner


def mine_cooccurrence(queries, vectors, missing=None, min_similarity=None):
    """Most similar co-occurring candidate per query by cosine similarity of ``vectors``.

    ``queries``: list of ``(user, target, candidates)`` (internal ids); ``vectors``: (n_items, d)
    array aligned to internal ids; ``missing``: bool (n_items,) items without a vector (never
    chosen; a target without a vector yields no pair). Returns ``(pairs, stats)`` with pairs
    ``(user, target, similar, score)``.
    """
    vec = np.asarray(vectors, dtype=np.float32)
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    vec = vec / np.maximum(norm, 1e-12)
    miss = np.zeros(len(vec), dtype=bool) if missing is None else np.asarray(missing, dtype=bool)
    pairs, stats = [], {"queries": len(queries), "pairs": 0, "no_target_vector": 0,
                        "no_candidate_vector": 0, "below_threshold": 0}
    for user, target, cands in queries:
        if miss[target]:
            stats["no_target_vector"] += 1
            continue
        c = np.asarray([x for x in cands if not miss[x]], dtype=np.int64)
        if c.size == 0:
            stats["no_candidate_vector"] += 1
            continue
        sims = vec[c] @ vec[target]
        k = int(np.argmax(sims))  # ties: the earliest candidate
        if min_similarity is not None and sims[k] < float(min_similarity):
            stats["below_threshold"] += 1
            continue
        pairs.append((user, int(target), int(c[k]), float(sims[k])))
    stats["pairs"] = len(pairs)
    return pairs, stats


# ============================================================================ LLM miner

DEFAULT_INSTRUCTION = (
    "You are an assistant that finds similar videos. You are given a target video and a list of "
    "candidate videos that the same user watched earlier, each written as id-title. Pick the single "
    "candidate that is most similar to the target video. Answer only with that candidate in the form "
    "id-title, or with -1 if no candidate is similar. Any other answer format is illegal."
)

_NONE_RE = re.compile(r"^\W*(?:-1(?!\d)|none\b|null\b|nothing\b|no similar|n/a\b)", re.I)
_PREFIX_RE = re.compile(r"^\s*(?:the\s+)?(?:answer|output|result|most similar(?: candidate)?)\s*(?:is)?\s*[:：]?\s*", re.I)


def _display_order(tokens):
    """Tokens sorted by id (numerically when every token is an integer), as the official code."""
    if all(re.fullmatch(r"-?\d+", t) for t in tokens):
        return sorted(tokens, key=int)
    return sorted(tokens)


def build_prompt(target, candidates, aligned=True, instruction=None):
    """Prompt text for one query; ``target`` = (token, title), ``candidates`` = [(token, title)].

    ``aligned=False`` reproduces the official bug: the chronological ids are zipped with the
    candidates' titles in ascending-id order.
    """
    lines = [instruction or DEFAULT_INSTRUCTION, "", f"Target video: {target[0]}-{_clean(target[1])}",
             "Candidate videos:"]
    if aligned:
        shown = [(tok, title) for tok, title in candidates]
    else:
        titles = dict(candidates)
        by_id = _display_order([tok for tok, _ in candidates])
        shown = [(tok, titles[other]) for (tok, _), other in zip(candidates, by_id)]
    lines += [f"{tok}-{_clean(title)}" for tok, title in shown]
    lines += ["", "Answer:"]
    return "\n".join(lines)


def _clean(title):
    return " ".join(str(title or "").split())


def parse_answer(text, candidates):
    """Parse an LLM answer into ``(token or None, status)``; never raises.

    ``candidates``: [(token, title)]. Status ``ok``: a candidate id occurs in the answer (the
    earliest occurrence wins, as a whole word); ``title``: no id, but a candidate's title is
    quoted; ``none``: the answer is -1 / none; ``illegal``: anything else (empty, garbage,
    ids that are not candidates).
    """
    if text is None:
        return None, "illegal"
    s = str(text).replace("\u2212", "-").strip().strip("`*\"'“”「」 ")
    s = _PREFIX_RE.sub("", s, count=1).strip().strip("`*\"'“”「」 ")
    if not s:
        return None, "illegal"
    if _NONE_RE.match(s):
        return None, "none"
    best = None
    for tok, _ in candidates:
        m = re.search(r"(?<![0-9A-Za-z_])" + re.escape(str(tok)) + r"(?![0-9A-Za-z_])", s)
        if m is None:
            continue
        key = (m.start(), -len(str(tok)))
        if best is None or key < best[0]:
            best = (key, tok)
    if best is not None:
        return best[1], "ok"
    low = s.lower()
    hits = []
    for tok, title in candidates:
        t = _clean(title).lower()
        if len(t) >= 4 and t in low:
            hits.append((low.find(t), -len(t), tok))
    if hits:
        return min(hits)[2], "title"
    return None, "illegal"


def _atomic_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LLMPairMiner:
    """Ask a ``transformers`` causal LM for the most similar candidate of each query.

    Args:
        model: hub name or local folder (loaded with ``AutoModelForCausalLM``), or a loaded model.
        tokenizer: a tokenizer (default: loaded from ``model``).
        batch_size: prompts per ``generate`` call (left padding).
        max_new_tokens: answer length; the id comes first, so a few tokens are enough.
        max_prompt_tokens: longer prompts are cut from the left (the answer cue is kept).
        chat_template: ``auto`` (use the tokenizer's chat template when it has one) | True | False.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16.
        device: torch device (default: CUDA when available).
        aligned, instruction: see :func:`build_prompt`.
    """

    def __init__(self, model, tokenizer=None, batch_size=8, max_new_tokens=32, max_prompt_tokens=4096,
                 chat_template="auto", dtype="auto", device=None, aligned=True, instruction=None,
                 trust_remote_code=False):
        import torch

        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if dtype in (None, "auto"):
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, str(dtype))
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.name = os.fspath(model)
            try:
                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(self.name, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(self.name, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code)
            except OSError as e:
                raise OSError(f"cannot load the pair-mining LLM {self.name!r}: {e}. Use a local model folder "
                              "or a hub name reachable from this machine.") from e
        else:
            self.name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
            if tokenizer is None:
                raise ValueError("a tokenizer is required with a loaded model")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            else:
                self.tokenizer.add_special_tokens({"pad_token": "[PAD]"})
                if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
                    self.model.resize_token_embeddings(len(self.tokenizer))
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        self.max_prompt_tokens = int(max_prompt_tokens)
        if limit:
            self.max_prompt_tokens = max(8, min(self.max_prompt_tokens, int(limit) - self.max_new_tokens))
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.chat = has_template if chat_template in ("auto", None) else bool(chat_template)
        if self.chat and not has_template:
            raise ValueError(f"pair_llm_chat_template is on but the tokenizer of {self.name!r} has no chat template")
        self.aligned = aligned
        self.instruction = instruction

    def settings(self):
        return {"model": self.name, "max_new_tokens": self.max_new_tokens, "max_prompt_tokens": self.max_prompt_tokens,
                "chat": self.chat, "aligned": bool(self.aligned), "instruction": self.instruction or DEFAULT_INSTRUCTION,
                "dtype": str(next(self.model.parameters()).dtype)}

    def _render(self, prompt):
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, prompts):
        """Raw answers (strings) for ``prompts``, batched, longest prompts first."""
        import torch

        texts = [self._render(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        answers = [None] * len(texts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_prompt_tokens, add_special_tokens=not self.chat)
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                answers[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return answers

    def mine(self, queries, titles, chunk_dir=None, chunk_size=256, show_progress=True):
        """Answers for ``queries`` = [(user, target_token, [candidate_tokens])].

        ``titles``: token -> title. Returns ``(records, stats)``; each record is
        ``(user, target, similar or None, status, answer)``. With ``chunk_dir`` every finished
        chunk of ``chunk_size`` users is saved atomically and reused by a later call with the
        same prompts and model (resume after an interruption).
        """
        from tqdm.auto import tqdm

        settings = self.settings()
        if chunk_dir is not None:
            os.makedirs(chunk_dir, exist_ok=True)
        records = []
        stats = {s: 0 for s in ANSWER_STATUSES}
        stats.update(queries=len(queries), reused_chunks=0)
        with tqdm(total=len(queries), desc="LLM pair mining", unit="user", disable=not show_progress,
                  dynamic_ncols=True) as bar:
            for k in range(0, len(queries), int(chunk_size)):
                chunk = queries[k:k + int(chunk_size)]
                cands = [[(c, titles.get(c, "")) for c in q[2]] for q in chunk]
                prompts = [build_prompt((q[1], titles.get(q[1], "")), cs, self.aligned, self.instruction)
                           for q, cs in zip(chunk, cands)]
                key = sha256_strings([json.dumps(settings, sort_keys=True)] + prompts)
                path = None if chunk_dir is None else os.path.join(chunk_dir, f"chunk_{k // int(chunk_size):06d}.json")
                answers = None
                if path is not None and os.path.isfile(path):
                    try:
                        with open(path, "r", encoding="utf-8") as f:
                            saved = json.load(f)
                        if saved.get("key") == key and len(saved.get("answers", [])) == len(chunk):
                            answers = saved["answers"]
                            stats["reused_chunks"] += 1
                    except (OSError, ValueError):
                        answers = None
                if answers is None:
                    answers = self.generate(prompts)
                    if path is not None:
                        _atomic_json(path, {"key": key, "answers": answers})
                for q, cs, ans in zip(chunk, cands, answers):
                    tok, status = parse_answer(ans, cs)
                    stats[status] += 1
                    records.append((q[0], q[1], tok, status, ans))
                bar.update(len(chunk))
        return records, stats


# ============================================================================ pair files

PAIR_HEADER = ["user", "target", "similar", "score"]


def write_pairs(path, pairs, manifest=None):
    """Write ``pairs`` [(user, target_token, similar_token, score)] as TSV, atomically; the
    optional ``manifest`` goes to ``<path>.json`` (written last)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    man = path + ".json"
    if os.path.exists(man):
        os.remove(man)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(PAIR_HEADER)
        for row in pairs:
            w.writerow(list(row) + [""] * (4 - len(row)))
    os.replace(tmp, path)
    if manifest is not None:
        _atomic_json(man, manifest)


def read_pair_manifest(path):
    try:
        with open(os.fspath(path) + ".json", "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_pairs(path):
    """Read a pair file: the TSV written by :func:`write_pairs`, or a header-less
    ``target,similar`` file such as the official ``item_pairs_id.txt``. Returns
    [(target_token, similar_token)]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pair file {path} not found")
    pairs = []
    with open(path, "r", encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f if line.strip()]
    if not lines:
        return pairs
    delim = "\t" if "\t" in lines[0] else ","
    first = [c.strip() for c in lines[0].split(delim)]
    if "target" in first and "similar" in first:
        ti, si = first.index("target"), first.index("similar")
        body = lines[1:]
    else:
        ti, si = 0, 1
        body = lines
    for n, line in enumerate(body, 1):
        cols = [c.strip() for c in line.split(delim)]
        if len(cols) <= max(ti, si) or not cols[ti] or not cols[si]:
            raise ValueError(f"{path}: line {n} is not a 'target{delim}similar' pair: {line!r}")
        pairs.append((cols[ti], cols[si]))
    return pairs


def queries_checksum(queries) -> str:
    return sha256_strings(f"{u}|{t}|{' '.join(map(str, c))}" for u, t, c in queries)


# ============================================================================ the pairs of a dataset


def stage1_pairs(dataset, show_progress=False):
    """Positive pairs ``(target, similar)`` as internal item ids (LongTensor P x 2) and a report."""
    config = dataset.config
    id2token = dataset.field2id_token[dataset.iid_field]
    token2id = {str(t): i for i, t in enumerate(id2token)}
    data_dir, name = config["data_path"], dataset.dataset_name
    pair_file = setting(config, "pair_file")
    drop_self = bool(setting(config, "pair_drop_self"))
    info = {}
    if pair_file:
        raw = read_pairs(pair_file)
        known = [(token2id.get(str(a)), token2id.get(str(b))) for a, b in raw]
        pairs = [(a, b) for a, b in known if a is not None and b is not None and a > 0 and b > 0]
        if drop_self:
            pairs = [(a, b) for a, b in pairs if a != b]
        info.update(source="file", path=os.path.abspath(pair_file), rows=len(raw), unknown_items=sum(
            1 for a, b in known if a is None or b is None), pairs=len(pairs))
        logger.info("SICSRec stage 1: %d pairs from %s (%d rows, %d with items unknown to the dataset)",
                    len(pairs), pair_file, len(raw), info["unknown_items"])
        return _pairs_tensor(pairs), info

    miner = setting(config, "pair_miner")
    if miner not in PAIR_MINERS:
        raise ValueError(f"pair_miner must be one of {PAIR_MINERS}, got {miner!r}")
    seqs = user_sequences(dataset)
    target_mode = setting(config, "pair_target")
    max_cands = setting(config, "pair_max_candidates")
    queries = []
    for s in seqs:
        q = pair_query(s, target_mode, drop_self, max_cands)
        if q is not None:
            queries.append((s.user, q[0], q[1]))
    info.update(source=miner, users=len(seqs), queries=len(queries), pair_target=target_mode)

    if miner == "cooccurrence":
        from recbole_mm.features import align_to_dataset, extract_features, items_to_encode

        feat = setting(config, "pair_feature") or base_feature_names(config).get(
            "text", base_feature_names(config).get("image"))
        spec = dataset.feature_spec(feat)
        fm = extract_features(data_dir, name, feat, spec, show_progress=show_progress,
                              items=items_to_encode(spec, id2token))
        table, missing, _ = align_to_dataset(fm, id2token)
        found, stats = mine_cooccurrence(queries, table, missing, setting(config, "pair_min_similarity"))
        pairs = [(t, s) for _, t, s, _ in found]
        info.update(stats, feature=feat)
        out = os.path.join(data_dir, f"{name}.sicsrec_pairs.cooccurrence.tsv")
        if _dist_info()[0] == 0:
            write_pairs(out, [(u, id2token[t], id2token[s], f"{sc:.4f}") for u, t, s, sc in found],
                        {"miner": "cooccurrence", "feature": feat, "stats": stats})
    else:
        pairs, llm_info = _llm_pairs(dataset, queries, id2token, token2id, show_progress)
        info.update(llm_info)
    if drop_self:
        pairs = [(a, b) for a, b in pairs if a != b]
    info["pairs"] = len(pairs)
    info["coverage"] = len(pairs) / max(1, len(seqs))
    logger.info("SICSRec stage 1: %s miner -> %d pairs for %d users (%.1f%%); %s", miner, len(pairs), len(seqs),
                100 * info["coverage"], {k: v for k, v in info.items() if k not in ("source",)})
    return _pairs_tensor(pairs), info


def _pairs_tensor(pairs):
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.tensor(pairs, dtype=torch.long)


def _item_titles(dataset, id2token):
    """token -> text of the text feature's spec (what the LLM reads)."""
    from recbole_mm.features import read_item_texts

    config = dataset.config
    feat = setting(config, "pair_title_feature") or setting(config, "text_feature")
    spec = dataset.feature_spec(feat)
    item_file = os.path.join(config["data_path"], f"{dataset.dataset_name}.item")
    tokens, texts = read_item_texts(item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"),
                                        missing_values=spec.get("missing_values"))
    return dict(zip(map(str, tokens), texts)), feat


def _llm_pairs(dataset, queries, id2token, token2id, show_progress):
    config = dataset.config
    model = setting(config, "pair_llm")
    if not model:
        raise ValueError("pair_miner: llm needs pair_llm: <hub name or local folder of a causal LM>")
    titles, title_feature = _item_titles(dataset, id2token)
    tq = [(u, str(id2token[t]), [str(id2token[c]) for c in cs]) for u, t, cs in queries]
    data_dir, name = config["data_path"], dataset.dataset_name
    out = os.path.join(data_dir, f"{name}.sicsrec_pairs.llm.tsv")
    settings = {
        "model": os.fspath(model), "aligned": bool(setting(config, "pair_prompt_aligned")),
        "max_new_tokens": int(setting(config, "pair_llm_max_new_tokens")),
        "max_prompt_tokens": int(setting(config, "pair_llm_max_prompt_tokens")),
        "chat_template": setting(config, "pair_llm_chat_template"),
        "dtype": str(setting(config, "pair_llm_dtype")), "instruction": setting(config, "pair_llm_prompt"),
    }
    from recbole_mm.features import encoder_fingerprint

    key = {"queries": queries_checksum(tq), "titles": sha256_strings(titles.get(c, "") for q in tq for c in [q[1]] + q[2]),
           "fingerprint": encoder_fingerprint(os.fspath(model)), **settings}
    manifest = read_pair_manifest(out)
    if manifest is not None and manifest.get("key") == key and os.path.isfile(out):
        pairs = [(token2id[a], token2id[b]) for a, b in read_pairs(out) if a in token2id and b in token2id]
        logger.info("SICSRec stage 1: reusing %d LLM pairs from %s", len(pairs), out)
        return pairs, {"llm": settings["model"], "reused": out, **manifest.get("stats", {})}
    miner = LLMPairMiner(
        model, batch_size=int(setting(config, "pair_llm_batch_size")), max_new_tokens=settings["max_new_tokens"],
        max_prompt_tokens=settings["max_prompt_tokens"], chat_template=settings["chat_template"],
        dtype=settings["dtype"], device=config["device"], aligned=settings["aligned"],
        instruction=settings["instruction"], trust_remote_code=bool(setting(config, "pair_llm_trust_remote_code")))
    # under torch.distributed every rank asks the LLM about the users r::world, rank 0 writes
    rank, world = _dist_info()
    chunk_dir = os.path.join(data_dir, f".{name}.sicsrec_pairs.llm.chunks")
    if world > 1:
        chunk_dir += f".shard{rank}of{world}"
    records, stats = miner.mine(tq[rank::world], titles, chunk_dir=chunk_dir,
                                chunk_size=int(setting(config, "pair_llm_chunk_size")), show_progress=show_progress)
    if world > 1:
        shards = _all_gather_object((records, stats))
        merged = [None] * len(tq)
        for r, (recs, _) in enumerate(shards):
            merged[r::world] = recs
        records = merged
        stats = {k: sum(st[k] for _, st in shards) for k in stats}
    found = [(u, t, s) for u, t, s, status, _ in records if s is not None]
    if rank == 0:
        write_pairs(out, [(u, t, s, "") for u, t, s in found],
                    {"key": key, "stats": stats, "title_feature": title_feature})
        write_pairs(out[:-4] + ".answers.tsv", [(u, t, s or "", f"{st}: {ans!r}") for u, t, s, st, ans in records])
    shutil.rmtree(chunk_dir, ignore_errors=True)
    _barrier()
    del miner
    _free_memory()
    n = max(1, stats["queries"])
    logger.info("SICSRec stage 1 LLM answers: %d ok, %d by title, %d none (-1), %d illegal of %d (%.1f%% usable)",
                stats["ok"], stats["title"], stats["none"], stats["illegal"], stats["queries"],
                100 * (stats["ok"] + stats["title"]) / n)
    return [(token2id[t], token2id[s]) for _, t, s in found], {"llm": settings["model"], **stats}


__all__ = [
    "UserSequence", "user_sequences", "pair_query", "mine_cooccurrence", "build_prompt", "parse_answer",
    "LLMPairMiner", "write_pairs", "read_pairs", "read_pair_manifest", "queries_checksum", "DEFAULT_INSTRUCTION",
    "stage1_pairs",
]
