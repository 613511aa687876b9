"""One Tokenizer interface over two real tokenizers.

- Llama-2's `tokenizer.model`: sentencepiece, with Meta's chat format ([INST], <<SYS>>).
- A GGUF file's embedded byte-level BPE (SmolLM2's): built with the `tokenizers` library from
  the vocabulary and merges in the file, with the chat template the file carries.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}

# Meta's chat format, as in llama/generation.py.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def find_tokenizer_model(ckpt_dir: Path) -> Path:
    """Meta's download keeps tokenizer.model one folder above llama-2-7b/; HF's keeps it inside."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"tokenizer.model not found in {ckpt_dir} or {ckpt_dir.parent}; pass its path with --tokenizer / tokenizer_path="
    )


def tokenizer_file(ckpt_path=None, tokenizer_path=None) -> Path:
    """The file that holds a checkpoint's tokenizer, found before any weight is read (so a
    missing one fails in milliseconds): tokenizer_path if given; for Meta's or Hugging Face's
    folder, its tokenizer.model; a .gguf file (None: the embedded model's) carries its own."""
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer file {tokenizer_path} not found; tokenizer_path takes the path of a "
                                    "tokenizer.model (or .gguf) file")
        return Path(tokenizer_path)
    if ckpt_path is None:
        from .gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    if Path(ckpt_path).is_dir():
        return find_tokenizer_model(Path(ckpt_path))
    return Path(ckpt_path)


class Tokenizer:
    """encode(text, bos, eos) -> ids; decode(ids) -> text; bos_id, eos_id, n_words."""

    def __init__(self, model_path: str | None = None, *, backend=None, bos_id: int = -1, eos_id: int = -1,
                 pad_id: int = -1, add_bos: bool = True, chat_template: str | None = None,
                 stop_ids: Sequence[int] = ()):
        if model_path is not None:  # Meta's signature: Tokenizer(model_path) is sentencepiece
            other = Tokenizer.from_sentencepiece(model_path)
            self.__dict__.update(other.__dict__)
            return
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos  # whether plain text completion starts with BOS for this model
        self.chat_template = chat_template
        self.stop_ids = sorted(set(stop_ids) | {eos_id})

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_sentencepiece(cls, model_path) -> Tokenizer:
        from sentencepiece import SentencePieceProcessor

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found: Llama-2 downloads have tokenizer.model beside the "
                "weights (or one folder up); pass its path with --tokenizer / tokenizer_path="
            )
        sp = SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from None
        tok = cls(backend=sp, bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), add_bos=True)
        return tok

    @classmethod
    def load(cls, path) -> Tokenizer:
        """A tokenizer.model (sentencepiece) or the tokenizer a .gguf file carries."""
        return cls.from_gguf(path) if Path(path).suffix == ".gguf" else cls.from_sentencepiece(path)

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """From a GGUF file's tokenizer.ggml.* fields (model 'gpt2': byte-level BPE)."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        from .gguf import gguf_field, open_gguf

        reader = open_gguf(reader)
        kind = gguf_field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens = gguf_field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
        types = gguf_field(reader, "tokenizer.ggml.token_type")
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        hf = HFTokenizer(bpe)
        # SmolLM2's pre-tokenizer ('smollm' in llama.cpp): digits one by one, then GPT-2's regex.
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        hf.decoder = decoders.ByteLevel()
        # Control tokens (type 3) such as <|im_start|> must be matched whole in text, never split.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
        bos = gguf_field(reader, "tokenizer.ggml.bos_token_id", -1)
        eos = gguf_field(reader, "tokenizer.ggml.eos_token_id", -1)
        pad = gguf_field(reader, "tokenizer.ggml.padding_token_id", -1)
        return cls(backend=hf, bos_id=bos, eos_id=eos, pad_id=pad,
                   add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
                   chat_template=gguf_field(reader, "tokenizer.chat_template", None))

    # -- the interface ---------------------------------------------------------------------
    @property
    def is_sentencepiece(self) -> bool:
        return hasattr(self.backend, "EncodeAsIds")

    @property
    def n_words(self) -> int:
        return self.backend.vocab_size() if self.is_sentencepiece else self.backend.get_vocab_size()

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        if self.is_sentencepiece:
            t = self.backend.encode(s)
        else:
            t = self.backend.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        """Token ids (integers in [0, n_words)) -> text. Floats and ids outside the vocabulary are
        refused with a ValueError/TypeError that names the id (not truncated, not skipped)."""
        if isinstance(t, (str, bytes)) or not hasattr(t, "__iter__"):
            raise TypeError(f"decode takes a list of token ids, got {type(t).__name__}")
        n = self.n_words
        ids = []
        for x in t:
            try:
                x = operator.index(x)
            except TypeError:
                raise TypeError(f"token ids must be integers, got {x!r} ({type(x).__name__})") from None
            if not 0 <= x < n:
                raise ValueError(f"token id {x} is outside the vocabulary (0 .. {n - 1})")
            ids.append(x)
        t = ids
        if self.is_sentencepiece:
            return self.backend.decode(t)
        return self.backend.decode(t, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_piece(i) if self.is_sentencepiece else self.backend.id_to_token(i)

    # -- chat ------------------------------------------------------------------------------
    def encode_dialog(self, dialog: Sequence[Message]) -> list[int]:
        """Prompt tokens for a chat, ending where the assistant's answer begins."""
        check_dialog(dialog)
        if self.chat_template:
            return self.encode(self.render_chat_template(dialog), bos=False, eos=False)
        return self._encode_llama2_dialog(dialog)

    def render_chat_template(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        # A sandbox: a template comes from a downloaded file and must not reach Python.
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=list(dialog), add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_piece(self.bos_id) if self.bos_id >= 0 else "",
            eos_token=self.id_to_piece(self.eos_id) if self.eos_id >= 0 else "",
        )

    def _encode_llama2_dialog(self, dialog: Sequence[Message]) -> list[int]:
        """Meta's chat_completion: the system prompt folds into the first user turn; each
        finished (user, assistant) pair is BOS [INST] user [/INST] answer EOS."""
        for m in dialog:
            if any(tag in m["content"] for tag in SPECIAL_TAGS):
                raise ValueError(f"special tags {SPECIAL_TAGS} are not allowed inside a message's content")
        if dialog[0]["role"] == "system":
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + list(dialog[2:])
        tokens: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += self.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                  bos=True, eos=True)
        tokens += self.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


def check_dialog(dialog: Sequence[Message]) -> None:
    """Meta's rules: an optional system message first, then user and assistant alternating,
    starting and ending with the user."""
    if isinstance(dialog, (str, dict)) or not isinstance(dialog, (list, tuple)):
        raise ValueError(f"a dialog is a list of messages ({{'role': 'user', 'content': ...}}), got {dialog!r}")
    if not dialog:
        raise ValueError("the dialog is empty: give at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}'s content must be a str")
    turns = list(dialog[1:] if dialog[0]["role"] == "system" else dialog)
    if not turns:
        raise ValueError("the dialog has a system message but no user message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(
                f"roles must be an optional 'system' first, then 'user' and 'assistant' alternating "
                f"(u/a/u/a/u...): turn {i} is {m['role']!r}, expected {want!r}"
            )
    if turns[-1]["role"] != "user":
        raise ValueError("the last message must be from the user")
