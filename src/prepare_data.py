"""Tokenize and pack a corpus once: `python src/prepare_data.py data=pile out=DIR num_proc=16`.

Any `data=` source (stdlib, text_files, hf: the hub or local files in the hub format). Writes Arrow shards,
the tokenizer and prepared.json (counts, preparation tokens/s per process, loading tokens/s) into DIR;
train with `data=prepared data.dir=DIR` (same seq_len). A bad value exits 2 before any work.
"""

from remoe.data.prepare import main

if __name__ == "__main__":
    main()
