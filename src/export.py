"""Export a checkpoint for Hugging Face transformers: `python src/export.py checkpoint=PATH out=DIR`.

The folder loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) (dense: plain
LlamaForCausalLM) and AutoTokenizer.from_pretrained(DIR); remoe.export.load_hf(DIR) reads it back.
"""

from remoe.export import main

if __name__ == "__main__":
    main()
