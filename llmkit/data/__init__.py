"""Fine-tuning data: files → documents → a token cache on disk → packed blocks.

Inputs are files (UTF-8 text of any kind; `.jsonl` with one JSON object per line, its text in
`text_field`), directories (searched recursively for `glob`, files sorted by path) and `-` for stdin.
Every file, and every JSONL record with non-empty text, is one document. Documents are tokenized
without special tokens and each one is followed by the tokenizer's EOS id; the ids go, streamed and
in order, into a flat numpy file under the cache directory, which is then cut into blocks of
`block_size` ids (no padding; a last partial block is dropped).

Prompt/completion JSONL (records.py, packing.py) is the other kind of data: each record becomes prompt ids +
completion ids + EOS with a learn mask (0 on the prompt), stored in the cache beside the ids, and
records are packed whole into blocks, the rest padding, so a completion never loses its prompt.

The cache is keyed by a fingerprint of what determines the ids: the content of the inputs in order
(never their paths), the options that change tokenization (`text_field`, `errors`) and the tokenizer
(its backend JSON and EOS id). A cache entry is `<fingerprint>.bin` plus a `<fingerprint>.json`
sidecar written last, both by atomic rename, so a half-written entry is never read back.

Nothing here prints: progress goes to an optional `on_progress(bytes_done, bytes_total)` callback and
problems with the data raise `InputError` with a hint. Importing this package loads only the standard
library; numpy, tokenizers and torch are imported when first needed.

    data = prepare(["corpus/"], tokenizer, block_size=512)
    data.train[0]           # np.ndarray of 512 int64 ids
    data.fingerprint        # record it with the run
"""

from llmkit.data.blocks import Blocks, PreparedData, collate, prepare, split_blocks
from llmkit.data.cache import ProgressFn, TokenData, default_cache_dir, tokenize
from llmkit.data.encoder import token_dtype
from llmkit.data.packing import RecordBlocks
from llmkit.data.sources import ReadStats, read_documents

__all__ = [
    "Blocks",
    "PreparedData",
    "ProgressFn",
    "ReadStats",
    "RecordBlocks",
    "TokenData",
    "collate",
    "default_cache_dir",
    "prepare",
    "read_documents",
    "split_blocks",
    "token_dtype",
    "tokenize",
]
