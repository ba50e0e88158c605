"""A word-level tokenizer for the synthetic worlds, built offline with `tokenizers`.

Every generated string is lower-case words separated by single spaces, so a WordLevel model
over whitespace-split words round-trips it exactly; fictional names are several syllable
words, i.e. several tokens. The vocabulary is the sorted set of words of the given texts
after the special tokens (pad 0, eos 1, bos 2, unk 3), so the ids depend only on which
words occur, not on text order or frequency. Build it from the worlds' declared
vocabularies (`World.vocabulary`, which do not depend on the seed) to serve every tier,
seed and task of those settings. Wrapped as a
`transformers.PreTrainedTokenizerFast`; save with `save_pretrained(dir)`, load with
`load(dir)`.

Rows for the model start with BOS: a question → answer pair is [bos] prompt answer [eos]
(`encode_examples`), and a pretraining text is [bos] text [eos] with the loss on every
token after BOS (`encode_corpus`, trained with `data.lm_batch(rows, loss_on='all')`). A
corpus text that *is* a question and its answer therefore tokenizes to exactly the row the
adapters train on.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lora_limits import data as data_lib
from lora_limits.tasks import common

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)


def build(texts: Iterable[str]) -> PreTrainedTokenizerFast:
  """A WordLevel tokenizer whose vocabulary is every word of `texts` (sorted)."""
  vocab_words = sorted({w for t in texts for w in t.split()})
  if not vocab_words:
    raise ValueError("tokenizer.build got no words")
  clash = sorted(set(vocab_words) & set(SPECIAL_TOKENS))
  if clash:
    raise ValueError(f"texts contain the special token(s) {clash} as words")
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(vocab_words))}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
      clean_up_tokenization_spaces=False)


def load(directory: str) -> PreTrainedTokenizerFast:
  """A tokenizer saved with `save_pretrained(directory)` (local files only).

  A missing directory or file, a damaged file, or special tokens other than ours (pad 0,
  eos 1, bos 2, unk 3; e.g. tokenizer_config.json lost) is a ValueError naming the path.
  """
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise ValueError(f"tokenizer directory {str(path)!r} does not exist")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    f = path / name
    if not f.is_file():
      raise ValueError(f"tokenizer directory {str(path)!r} lacks {name} (save it with "
                       "save_pretrained)")
    try:
      json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{str(f)!r} is not a readable JSON file ({type(e).__name__}: {e}); it "
                       "is truncated or corrupt") from e
  try:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ValueError(f"the tokenizer in {str(path)!r} cannot be loaded ({type(e).__name__}: "
                     f"{str(e)[:300]})") from e
  got = {"pad": (tok.pad_token, tok.pad_token_id), "eos": (tok.eos_token, tok.eos_token_id),
         "bos": (tok.bos_token, tok.bos_token_id), "unk": (tok.unk_token, tok.unk_token_id)}
  want = dict(zip(got, ((t, i) for i, t in enumerate(SPECIAL_TOKENS))))
  if got != want:
    raise ValueError(f"the tokenizer in {str(path)!r} has special tokens {got}; expected "
                     f"{want} (is tokenizer_config.json from another tokenizer?)")
  return tok


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
  """Token ids of `text` (no special tokens); an unknown word is a ValueError naming it."""
  ids = tokenizer.encode(text, add_special_tokens=False)
  unk = tokenizer.unk_token_id
  if unk in ids:
    unknown = [w for w in text.split() if tokenizer.convert_tokens_to_ids(w) == unk]
    raise ValueError(f"words {unknown[:5]} of {text!r} are not in the tokenizer's vocabulary")
  return ids


def decode(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
  """Text of `ids` up to (not including) the first EOS; other special tokens stay visible."""
  ids = [int(i) for i in ids]
  if tokenizer.eos_token_id in ids:
    ids = ids[:ids.index(tokenizer.eos_token_id)]
  return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> int:
  """Raise ValueError on the first text that does not survive encode → decode; returns count."""
  n = 0
  for text in texts:
    back = decode(tokenizer, encode_text(tokenizer, text))
    if back != text:
      raise ValueError(f"tokenizer does not round-trip {text!r}: got {back!r}")
    n += 1
  return n


def _prefix(tokenizer: PreTrainedTokenizerFast, add_bos: bool) -> list[int]:
  """[bos] when asked for and the tokenizer has one (some checkpoints, e.g. Qwen2, have none)."""
  return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def prompt_ids(tokenizer, prompt: str, add_bos: bool = True) -> list[int]:
  """Token ids of a question: through the tokenizer's chat template when it has one (the
  instruction-tuned checkpoints the paper uses), else [bos] + the words."""
  if getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
      ids = ids["input_ids"]
    return [int(i) for i in ids]
  return _prefix(tokenizer, add_bos) + encode_text(tokenizer, prompt)


def pad_id(tokenizer: PreTrainedTokenizerFast) -> int:
  """The id rows are right-padded with: the pad token, else EOS (many Hugging Face tokenizers,
  Llama's among them, have no pad token). Padding is never attended to by a real position
  nor scored, so which id fills it does not change any result."""
  if tokenizer.pad_token_id is not None:
    return tokenizer.pad_token_id
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has neither a pad nor an EOS token to pad rows with")
  return tokenizer.eos_token_id


def encode_examples(tokenizer: PreTrainedTokenizerFast, examples: Sequence[common.Example],
                    max_len: int | None = None, add_bos: bool = True) -> data_lib.Encoded:
  """Question → answer rows: [bos] prompt answer [eos], right-padded (see `data.encode`)."""
  if not examples:
    raise ValueError("encode_examples got no examples")
  pairs = [(prompt_ids(tokenizer, e.prompt, add_bos), encode_text(tokenizer, e.answer))
           for e in examples]
  return data_lib.encode(pairs, eos_id=tokenizer.eos_token_id, pad_id=pad_id(tokenizer),
                         max_len=max_len)


def encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str],
                  max_len: int | None = None, add_bos: bool = True) -> data_lib.Encoded:
  """Pretraining rows: [bos] text [eos]; `lm_batch(rows, loss_on='all')` trains every token.

  Without BOS the first word is the prompt and the rest the answer.
  """
  if not texts:
    raise ValueError("encode_corpus got no texts")
  pairs = []
  for t in texts:
    ids = encode_text(tokenizer, t)
    if add_bos:
      pairs.append(([tokenizer.bos_token_id], ids))
    else:
      if len(ids) < 2:
        raise ValueError(f"text {t!r} is too short to split without BOS")
      pairs.append((ids[:1], ids[1:]))
  return data_lib.encode(pairs, eos_id=tokenizer.eos_token_id, pad_id=pad_id(tokenizer),
                         max_len=max_len)


def max_tokens(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> int:
  """Longest text in tokens (without specials)."""
  return int(max((len(encode_text(tokenizer, t)) for t in texts), default=0))


def vocab_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
  return dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))

