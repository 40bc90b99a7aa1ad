"""AnLLM-AC data step: an <AC> anchor after every sentence end (data.source 'ac:SOURCE').

Sentence ends (a regex stand-in for a sentence splitter, good for prose and source code):
a newline (with any '.', '!', '?' right before it), or '.', '!', '?' followed by whitespace
or the end of the text. "<AC>" goes right after the end: "One. Two.\\n" -> "One.<AC> Two.\\n<AC>".
The byte tokenizer maps the literal "<AC>" to its AC id; `strip_ac` undoes the insertion.
"""
import re

from data.tokenizer import AC_TEXT

_SENTENCE_END = re.compile(r"[.!?]*\n|[.!?]+(?=\s|$)")


def insert_ac(text: str) -> str:
  """`text` with "<AC>" after every sentence end."""
  return _SENTENCE_END.sub(lambda m: m.group(0) + AC_TEXT, text)


def strip_ac(text: str) -> str:
  """Inverse of insert_ac (for text that had no literal "<AC>" of its own)."""
  return text.replace(AC_TEXT, "")


class ACDocuments:
  """Documents of another source with <AC> inserted on access."""

  def __init__(self, documents):
    self.documents = documents

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index: int) -> str:
    return insert_ac(self.documents[index])
