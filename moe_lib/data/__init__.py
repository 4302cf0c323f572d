"""Text in, token tensors out: corpora, tokenizers, document splits, batches and a disk cache.

One module per step: :mod:`.documents`, :mod:`.corpora` (with :mod:`.shakespeare` and :mod:`.hub`),
:mod:`.tokenizers`, :mod:`.splits` (splits and batches) and :mod:`.cache` (:func:`prepare_data`).
The public names are importable from ``moe_lib.data`` itself.

The pipeline behind :func:`prepare_data` runs in this order, and the order is the point:

1. **Documents.** A corpus yields :class:`Document` objects (text plus metadata such as a
   play's genre). Caps (``max_documents``, ``max_tokens``) keep a prefix of the corpus.
2. **Split documents, not windows.** Documents are shuffled with ``split_seed`` and dealt
   into train / val / test *before* anything is tokenized or windowed, so no sentence can be
   seen in training and then scored in evaluation.
3. **Tokenizer.** Fixed tokenizers (``gpt2``, ``hf:<repo>``) are loaded; trainable ones
   (``char``, ``bpe``) learn their vocabulary from the *training* split only, as a real
   tokenizer would never have seen the test set.
4. **Token streams.** Each split is its documents' tokens concatenated, each document
   followed by the end-of-text id, with ``doc_offsets`` and the documents' metadata kept so
   any subset (say, the tragedies of the test split) can be evaluated on its own.
5. **Cache.** The streams (and a trained tokenizer) are written to disk under a key that
   covers every setting above plus a hash of the raw documents, so a second call is fast and
   an edited input file can never be served stale tokens.

Batches come from :func:`sample_batch` (random windows, for training) and
:func:`eval_batches` (non-overlapping windows covering a split, for evaluation).

Only ``shakespeare`` + ``char`` / ``gpt2`` / ``bpe`` (and your own ``text:`` files) work
offline. Anything that needs the Hugging Face Hub checks first, and fails within seconds with
:class:`HubUnavailableError` instead of sitting in retries.
"""

from .cache import CACHE_VERSION, documents_fingerprint, prepare_data
from .corpora import CORPORA, HUB_CORPORA, cache_root, effective_caps, hub_documents, list_corpora, load_documents, text_documents
from .documents import Document, EmptyCorpusError
from .hub import OFFLINE_ALTERNATIVES, HubUnavailableError, hub_reachable
from .shakespeare import line_role_agreement, line_roles, markdown_line_roles, shakespeare_documents, strip_markdown
from .splits import SPLITS, PreparedData, TokenSplit, encode_split, eval_batches, sample_batch, split_documents
from .tokenizers import (
    EOS_TEXT, TOKENIZERS, ByteLevelBPE, CharTokenizer, HubTokenizer, TiktokenGPT2, Tokenizer, gpt2_tokenizer, list_tokenizers,
    load_fixed_tokenizer, train_tokenizer,
)

__all__ = [
    "CORPORA", "TOKENIZERS", "HUB_CORPORA", "SPLITS", "EOS_TEXT", "CACHE_VERSION", "OFFLINE_ALTERNATIVES",
    "Document", "HubUnavailableError", "EmptyCorpusError",
    "list_corpora", "list_tokenizers", "hub_reachable", "effective_caps", "load_documents",
    "shakespeare_documents", "text_documents", "hub_documents", "strip_markdown",
    "line_roles", "markdown_line_roles", "line_role_agreement",
    "Tokenizer", "CharTokenizer", "TiktokenGPT2", "ByteLevelBPE", "HubTokenizer", "gpt2_tokenizer",
    "load_fixed_tokenizer", "train_tokenizer", "split_documents", "TokenSplit", "encode_split",
    "PreparedData", "prepare_data", "cache_root", "documents_fingerprint", "sample_batch", "eval_batches",
]
