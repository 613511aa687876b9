"""llama-lite: LLaMA-2 built one component at a time. See notebooks/ for the story."""
import warnings

# tqdm.auto (imported by transformers and huggingface_hub) warns in Jupyter when ipywidgets is
# missing; whether it is installed must not change what a notebook prints (nbval compares it).
warnings.filterwarnings("ignore", message="IProgress not found")

from .config import ModelArgs, count_parameters
from .generation import Llama, sample_top_p
from .kv_cache import KVCache, kv_cache_bytes
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Llama", "count_parameters", "kv_cache_bytes", "KVCache",
           "sample_top_p"]
__version__ = "0.1.0"
