"""A sentence-structured text corpus with cross-sentence facts (for bench/anchor.py).

Each document is one line of simple sentences ending in '.': a chain of fillers ("the red fox
sees the old map. the old map holds ...": most sentences start with the previous one's
object) and facts ("mia has 7 cups."), each fact restated later ("again, mia has 7
cups."), so predicting the restated digit needs a fact from k sentences back. The probe
asks exactly that on held-out names/digits/fillers: accuracy vs k, chance 10%. The chain probe
asks for the object of the previous sentence as the next one's subject (one sentence back, so
under AnSAN it must pass through that sentence's anchor).

`write_prose` writes natural English instead: the Python docs shipped with every
interpreter (pydoc_data topics) and the standard library's docstrings, one file per topic or
module, line-wrapped paragraphs joined into one line each (code blocks kept as they are).

  python bench/anchor_corpus.py DIR [N_DOCS]     # writes DIR/doc_00000.txt ...
"""
import ast
import os
import re
import sys
import sysconfig

import numpy as np

NAMES = ('mia ava leo max zoe eli ian amy bob cat dan eva fay gus hal ivy jon kim lou ned '
         'oli pam ray sam tom una val wes yan zed').split()
ADJ = 'red old big small new green quick slow dark bright calm loud'.split()
NOUN = 'fox map dog tree boat lamp bird cake door ship coin road'.split()
VERB = 'sees finds likes moves holds takes paints opens'.split()
THING = 'cups pens hats keys rings bags'.split()


def filler(r, subject=None):
  """'the ADJ NOUN VERB the ADJ NOUN.'; with `subject` (the previous filler's object) the
  sentence continues the chain, so its first words need the previous sentence."""
  subject = subject or f'{r.choice(ADJ)} {r.choice(NOUN)}'
  return f'the {subject} {r.choice(VERB)} the {r.choice(ADJ)} {r.choice(NOUN)}.'


def obj(sentence):
  """A filler's object: 'the red fox sees the old map.' -> 'old map'."""
  return sentence[:-1].split(' the ')[-1]


def chain(r, n, p_continue=0.8):
  """n fillers; each continues the previous one's object with probability p_continue."""
  out = [filler(r)]
  for _ in range(n - 1):
    out.append(filler(r, obj(out[-1]) if r.random() < p_continue else None))
  return out


def fact(name, digit, thing, again=False):
  return f"{'again, ' if again else ''}{name} has {digit} {thing}."


def document(r, n_sentences=14, n_facts=3):
  """One line: fillers with n_facts facts, each restated 1..8 sentences later."""
  sents = chain(r, n_sentences)
  names = r.choice(NAMES, n_facts, replace=False)
  for name in names:
    digit, thing = r.integers(10), r.choice(THING)
    at = int(r.integers(0, n_sentences - 2))
    later = min(at + 1 + int(r.integers(0, 8)), len(sents))
    sents.insert(later, fact(name, digit, thing, again=True))
    sents.insert(at, fact(name, digit, thing))
  return ' '.join(sents) + '\n'


def write_corpus(directory, n_docs=3000, seed=0, **document_kw):
  os.makedirs(directory, exist_ok=True)
  r = np.random.default_rng(seed)
  for i in range(n_docs):
    with open(os.path.join(directory, f'doc_{i:05d}.txt'), 'w') as f:
      f.write(document(r, **document_kw))
  return os.path.join(directory, '*.txt')


def unwrap(text):
  """Paragraphs (blank-line separated) with no indented line become one line each."""
  paras = [p.strip('\n') for p in text.split('\n\n')]
  return '\n\n'.join(p if any(l[:1].isspace() for l in p.splitlines()) else
                      ' '.join(p.split('\n')) for p in paras if p.strip())


def write_prose(directory, skip=('test', 'tests', 'idlelib', 'site-packages', 'lib2to3',
                                 'turtledemo', '__pycache__')):
  """The interpreter's own English prose: pydoc topics and module/class/function docstrings."""
  import pydoc_data.topics
  os.makedirs(directory, exist_ok=True)
  docs = {f'topic_{k}': v for k, v in pydoc_data.topics.topics.items()}
  root = sysconfig.get_paths()['stdlib']
  for dirpath, dirnames, files in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(dirpath, name)
      try:
        with open(path, encoding='utf-8') as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      strings = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(
          n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
      text = '\n\n'.join(d for d in strings if d)
      if len(text) > 200:
        docs['doc_' + os.path.relpath(path, root).replace(os.sep, '.')] = text
  for key, text in docs.items():
    safe = re.sub(r'[^A-Za-z0-9_.-]', '_', key)
    with open(os.path.join(directory, f'{safe}.txt'), 'w') as f:
      f.write(unwrap(text) + '\n')
  return os.path.join(directory, '*.txt')


def probe(k, n, seed=1):
  """n (prefix, answer digit) pairs: 3 facts, k fillers, then "again, NAME has " for the
  first (k=0: right after). The asked fact is k + 2 sentences back (two distractor facts)."""
  r = np.random.default_rng(1000 * seed + k)
  out = []
  for _ in range(n):
    names = r.choice(NAMES, 3, replace=False)
    digits = r.choice(10, 3, replace=False)
    things = r.choice(THING, 3)
    sents = [fact(a, d, t) for a, d, t in zip(names, digits, things)]
    sents += [filler(r) for _ in range(k)]
    text = ' '.join(sents) + f' again, {names[0]} has '
    out.append((text, str(digits[0])))
  return out


def chain_probe(n, seed=1):
  """n (prefix, answer) pairs: three chained fillers then " the "; the answer is the last
  filler's object ("old map"), which a continuing sentence repeats (80% of them in training)."""
  r = np.random.default_rng(1000 * seed + 999)
  out = []
  for _ in range(n):
    sents = chain(r, 3, p_continue=1.0)
    out.append((' '.join(sents) + ' the ', obj(sents[-1])))
  return out


if __name__ == '__main__':
  print(write_corpus(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3000))
