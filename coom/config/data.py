"""The data section: sources, tokenizer and samples."""
from dataclasses import dataclass, field
from typing import Literal, Optional

from coom.config.checks import positive, require

MixturePlan = Literal["proportional", "temperature", "unimax"]


@dataclass
class MixtureChange:
    """A change of the language mixture during a run."""

    step: int = 0
    """The optimizer step after which the new plan applies."""

    mixture: MixturePlan = "proportional"
    """The plan after that step: as data.mixture."""

    mixture_alpha: float = 0.3
    """Its exponent, for 'temperature': as data.mixture_alpha."""

    def __post_init__(self):
        positive(self, "step")
        require(0 <= self.mixture_alpha <= 1, "mixture_alpha",
                f"must lie in [0, 1], got {self.mixture_alpha}")


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes token samples."""

    paths: list[str] = field(default_factory=list)
    """Sources to train on. Each is a .txt file, a .jsonl file, a folder
    (every .txt and .jsonl file under it), or the prefix of an existing
    Megatron indexed dataset (PREFIX.bin and PREFIX.idx). Empty: the
    embedded default corpus, the Python standard library's source."""

    weights: Optional[list[float]] = None
    """Blend weight of each entry of paths (Megatron's --data-path
    weights). None weighs sources by their size, or with languages by
    the mixture plan."""

    languages: Optional[list[str]] = None
    """The language of each entry of paths: an ISO 639 code (en, de, zh,
    yue); 'field:KEY' for the code in each .jsonl record's field KEY; or
    'identify' to identify each document's language when it is prepared
    (the optional py3langid; 'identify:en+de' picks among those). The
    last two prepare the documents apart by language. The entry
    'gettext' of paths (the machine's translated program messages,
    ``coom/data/locale_sample.py``) needs none. With languages, the
    mixture plan weighs the sources (``docs/multilingual.md``)."""

    mixture: MixturePlan = "proportional"
    """How the run's tokens are shared among languages: as the data
    comes ('proportional'), in proportion to each language's tokens to
    the power mixture_alpha ('temperature', as mT5 and XLM-R), or evenly
    up to max_epochs repeats of each language ('unimax')."""

    mixture_alpha: float = 0.3
    """The exponent of the 'temperature' plan: 1 is proportional, 0
    gives every language the same share."""

    max_epochs: Optional[float] = None
    """The most times the run may repeat any language's data: the cap of
    'unimax' (which needs it), and a limit every plan is checked
    against."""

    mixture_schedule: list[MixtureChange] = field(default_factory=list)
    """Changes of the mixture over the run, in step order, e.g. [{step:
    500, mixture: unimax}]: mixture and mixture_alpha apply until the
    first. Each language's data goes on where the previous plan left it,
    and max_epochs caps its repeats over the whole run."""

    text_key: str = "text"
    """Field holding the document text in .jsonl files."""

    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer.json to use. None trains a byte-level BPE
    on the sources."""

    tokenizer_vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained by COOM."""

    tokenizer_alpha: float = 1.0
    """When COOM trains the tokenizer on sources with languages, each
    language's share of its training text is proportional to the
    language's bytes to this power, before tokenizer_floor (1: as the
    text comes; mT5's 0.3 lifts every smaller language)."""

    tokenizer_floor: float = 0.6
    """When COOM trains the tokenizer on sources with languages, each
    language gets at least this fraction of an equal share of its
    training text (0: none), so rare languages and scripts get
    vocabulary while the large ones keep theirs. 0.6 measured the best
    trade-off on 95 languages (``docs/multilingual.md``)."""

    eod_token: str | None = None
    """The token written after each document (Megatron: the tokenizer's
    eod). None takes the eos_token of the tokenizer_config.json beside
    the tokenizer.json, as Megatron's preprocess_data.py does, and
    otherwise <|endoftext|>, the one special token of a tokenizer trained
    by COOM. A document whose text holds this token's string is split
    there (a warning says so once)."""

    seq_length: int = 256
    """Tokens per training sample."""

    split: str = "98,2,0"
    """Train, validation and test shares of the documents, as in
    Megatron's --split."""

    cache_dir: str = ".cache/coom"
    """Folder for tokenizers, prepared datasets and sample indices; reused
    while sources and tokenizer are unchanged."""

    num_workers: int = 2
    """Processes that tokenize the sources."""

    synthetic: bool = False
    """Train on uniformly random tokens instead of the sources, with no
    tokenizer (for benchmarks); model.vocab_size must then be set."""

    def __post_init__(self):
        positive(self, "tokenizer_vocab_size", "seq_length", "num_workers")
        require(self.tokenizer_vocab_size >= 257, "tokenizer_vocab_size",
                "must be at least 257 (256 bytes plus end-of-document)")
        require(self.eod_token != "", "eod_token",
                "must name a token; leave it unset for the tokenizer's own")
        if self.languages is not None:
            require(len(self.languages) == len(self.paths), "languages",
                    f"has {len(self.languages)} entries but paths has "
                    f"{len(self.paths)}")
            require(self.weights is None, "weights", "cannot be set with "
                    "languages, whose mixture plan weighs the sources")
        steps = [change.step for change in self.mixture_schedule]
        require(steps == sorted(set(steps)), "mixture_schedule",
                f"steps must increase; got {steps}")
        for name in ("mixture_alpha", "tokenizer_alpha", "tokenizer_floor"):
            value = getattr(self, name)
            require(0 <= value <= 1, name,
                    f"must lie in [0, 1], got {value}")
        if self.max_epochs is not None:
            positive(self, "max_epochs")
        if self.weights is not None:
            require(len(self.weights) == len(self.paths), "weights",
                    f"has {len(self.weights)} entries but paths has "
                    f"{len(self.paths)}")
            require(all(w > 0 for w in self.weights), "weights",
                    "every weight must be positive")
        shares = self.split.replace("/", ",").split(",")
        try:
            values = [float(s) for s in shares]
        except ValueError:
            values = []
        require(1 <= len(values) <= 3 and all(v >= 0 for v in values)
                and len(values) > 1 and values[1] > 0 and values[0] > 0,
                "split", f"'{self.split}' must look like '98,2,0' with "
                "positive train and validation shares")
