"""RULER-style long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"), defined on text and tokenized by any tokenizer.

  ex = example('niah_single_2', length=4096, tokenizer=get_tokenizer('hf:DIR'), seed=7)
  ex.prompt_ids        # BOS + task text + answer prefix, int32; + ex.max_new_tokens <= 4096
  score(generated_text, ex.references)   # RULER's metric: fraction of references present

Tasks (RULER's names, templates and synthetic.yaml parameters; TASKS below):
  niah_single_1..3     one needle; haystack noise / prose / prose; value number / number / UUID
  niah_multikey_1..3   distractor needles: 4 keys in prose; a haystack made of needles (word
                       keys, then UUID keys and values)
  niah_multivalue      4 values for the queried key
  niah_multiquery      4 queried keys
  vt                   variable tracking: a chain of 4 hops "VAR B = VAR A" in noise
  cwe                  common words extraction: the 10 words repeated most in a numbered list
  fwe                  frequent words extraction: the 3 most frequent words of Zipf(2) text
The length is counted in the tokenizer's tokens: as in RULER, each example takes the largest
haystack for which BOS + prompt + max_new_tokens fits `length`. Needles go at RULER's depths
(one of 40 evenly spaced percentages, drawn per needle) or at a given `depth` (0..1). The
score is RULER's string_match_all (niah, vt, cwe, fwe): per example, the fraction of its
references found in the generated text, case-insensitive.

Deviations (this runs on any machine, with nothing downloaded):
- the prose haystack is the Python standard library's pydoc topics (about 465K characters of
  English documentation), not Paul Graham's essays;
- needle keys are two words of that prose joined by '-', not wonderwords' adjective-noun
  pairs; cwe draws its words from the same prose;
- sentences are split after '.', '!' or '?' (and runs over 400 characters between words),
  not by nltk's sent_tokenize; a depth is a fraction of the characters, not of the sentences;
- cwe lists at most as many distinct words as the prose has (about VOCAB below): past that
  length its examples are shorter than asked (RULER falls back to a larger word list);
- each example draws from its own seeded generator; RULER shuffles every example's needles
  and word lists with the one global seed.
"""
import dataclasses
import functools
import random
import re
import string
import uuid

import numpy as np

NOISE = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
NEEDLE = 'One of the special magic {type_needle_v} for {key} is: {value}.'
HELD_OUT = 1_000_000          # evaluation seeds; NAMM fitness and training draw below it
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()

TEMPLATES = {   # RULER's scripts/data/synthetic/constants.py: (template, answer prefix, tokens)
    'niah': ('Some special magic {type_needle_v} are hidden within the following text. Make '
             'sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n'
             '{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned '
             'in the provided text?',
             ' The special magic {type_needle_v} for {query} mentioned in the provided text are',
             128),
    'vt': ('Memorize and track the chain(s) of variable assignment hidden in the following '
           'text.\n\n{context}\nQuestion: Find all variables that are assigned the value '
           '{query} in the text above.',
           ' Answer: According to the chain(s) of variable assignment in the text above, '
           '{num_v} variables are assigned the value {query}, they are: ', 30),
    'cwe': ('Below is a numbered list of words. In these words, some appear more often than '
            'others. Memorize the ones that appear most often.\n{context}\nQuestion: What are '
            'the 10 most common words in the above list?',
            ' Answer: The top 10 words that appear most often in the list are:', 120),
    'fwe': ('Read the following coded text and track the frequency of each coded word. Find '
            'the three most frequently appeared coded words. {context}\nQuestion: Do not '
            "provide any explanation. Please ignore the dots '....'. What are the three most "
            'frequently appeared words in the above coded text?',
            ' Answer: According to the coded text above, the three most frequently appeared '
            'words are:', 50),
}


def _niah(haystack, k, v, num_k=1, num_v=1, num_q=1):
  return dict(kind='niah', type_haystack=haystack, type_needle_k=k, type_needle_v=v,
              num_needle_k=num_k, num_needle_v=num_v, num_needle_q=num_q)


TASKS = {   # RULER's scripts/synthetic.yaml
    'niah_single_1': _niah('noise', 'words', 'numbers'),
    'niah_single_2': _niah('essay', 'words', 'numbers'),
    'niah_single_3': _niah('essay', 'words', 'uuids'),
    'niah_multikey_1': _niah('essay', 'words', 'numbers', num_k=4),
    'niah_multikey_2': _niah('needle', 'words', 'numbers'),
    'niah_multikey_3': _niah('needle', 'uuids', 'uuids'),
    'niah_multivalue': _niah('essay', 'words', 'numbers', num_v=4),
    'niah_multiquery': _niah('essay', 'words', 'numbers', num_q=4),
    'vt': dict(kind='vt', num_chains=1, num_hops=4),
    'cwe': dict(kind='cwe', freq_cw=30, freq_ucw=3, num_cw=10),
    'fwe': dict(kind='fwe', alpha=2.0, coded_wordlen=6),
}


@dataclasses.dataclass
class Example:
  task: str
  length: int                 # the budget in tokens: len(prompt_ids) + max_new_tokens <= it
  text: str                   # the task text (template with its context)
  answer_prefix: str          # appended to the text: generation continues it
  references: list            # the strings the answer must contain
  prompt_ids: np.ndarray      # int32 [P]: BOS + text + answer prefix
  max_new_tokens: int
  depth: float | None         # the needles' depth when given, else None (RULER's draw)
  question_tokens: int = 0    # the prompt's last tokens after the context: the question and
                              # answer prefix (kvpress's query-agnostic setting appends them
                              # after compressing the rest)


# --- the text every machine has ------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def prose_words():
  """The pydoc topics of the running Python as one list of whitespace-separated words."""
  import pydoc_data.topics
  text = ' '.join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
  return re.sub(r'\s+', ' ', text).strip().split(' ')


@functools.lru_cache(maxsize=1)
def vocabulary():
  """Sorted distinct lowercase words (3-12 letters) of the prose: keys and cwe's words."""
  return sorted({w for w in re.findall(r'\b[a-z]{3,12}\b', ' '.join(prose_words()))})


def _sentences(text, longest=400):
  """`text` cut after '.', '!' or '?'; a longer run without one (the prose has code and
  tables) is cut between words every ~`longest` characters, so that depths land near their
  fraction of the text."""
  out = []
  for s in re.split(r'(?<=[.!?])\s+', text.strip()):
    while len(s) > longest:
      cut = s.rfind(' ', 0, longest)
      cut = cut if cut > 0 else longest
      out.append(s[:cut])
      s = s[cut:].lstrip()
    out += [s] if s else []
  return out


# --- generators: (rng, params, size, depth) -> (text, answer prefix, references) ------------

def _random(rng, kind):
  if kind == 'numbers':
    return str(rng.randint(10**6, 10**7 - 1))
  if kind == 'words':
    words = vocabulary()
    return f'{rng.choice(words)}-{rng.choice(words)}'
  if kind == 'uuids':
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  raise ValueError(f'ruler: unknown needle type {kind!r}')


def _insert_at(rng, n, count, depth, sizes=None):
  """`count` insertion indexes into n items: at `depth` (0..1), or at RULER depths drawn
  (percentages). With the items' `sizes` (characters), a depth is a fraction of the text,
  not of the items: prose sentences differ in length by 100x."""
  fractions = [depth] * count if depth is not None else [d / 100 for d in rng.sample(DEPTHS,
                                                                                      count)]
  if sizes is None:
    return sorted(round(f * n) for f in fractions)
  starts = np.concatenate([[0], np.cumsum(sizes)])      # item i starts at starts[i]
  return sorted(int(np.abs(starts - f * starts[-1]).argmin()) for f in fractions)


def _niah_text(rng, p, size, depth):
  num_k = max(p['num_needle_k'], p['num_needle_q'])
  keys, values, needles = [], [], []
  for _ in range(num_k):
    keys.append(_random(rng, p['type_needle_k']))
    values.append([_random(rng, p['type_needle_v']) for _ in range(p['num_needle_v'])])
    needles += [NEEDLE.format(type_needle_v=p['type_needle_v'], key=keys[-1], value=v)
                for v in values[-1]]
  rng.shuffle(needles)
  if p['type_haystack'] == 'essay':
    words = prose_words()
    text = ' '.join((words * (size // len(words) + 1))[:size])
    sents = _sentences(text)
    at = _insert_at(rng, len(sents), len(needles), depth, [len(s) + 1 for s in sents])
    pieces, last = [], 0
    for i, needle in zip(at, needles):
      pieces += [' '.join(sents[last:i]), needle]
      last = i
    context = ' '.join(x for x in pieces + [' '.join(sents[last:])] if x)
  else:
    if p['type_haystack'] == 'noise':
      sents = [NOISE] * size
    else:                                       # 'needle': distractor needles
      sents = [NEEDLE.format(type_needle_v=p['type_needle_v'],
                             key=_random(rng, p['type_needle_k']),
                             value=_random(rng, p['type_needle_v'])) for _ in range(size)]
    at = (_insert_at(rng, size, len(needles), depth) if depth is not None else
          sorted(rng.sample(range(size + 1), len(needles))))
    for j, (i, needle) in enumerate(zip(at, needles)):
      sents.insert(i + j, needle)
    context = '\n'.join(sents)
  queried = rng.sample(range(num_k), p['num_needle_q'])
  queries = [keys[i] for i in queried]
  references = [a for i in queried for a in values[i]]
  query = (', '.join(queries[:-1]) + ', and ' + queries[-1]) if len(queries) > 1 else queries[0]
  template, prefix, _ = TEMPLATES['niah']
  type_v = p['type_needle_v']
  if p['num_needle_q'] * p['num_needle_v'] == 1:        # RULER's singular wording
    template = template.replace('Some', 'A').replace('are all', 'is').replace('are', 'is')
    prefix = prefix.replace('are', 'is')
    type_v = type_v[:-1]
  fill = dict(type_needle_v=type_v, query=query)
  return template.format(context=context, **fill), prefix.format(**fill), references


def _vt_text(rng, p, size, depth):
  n_vars = p['num_chains'] * (p['num_hops'] + 1)
  names = []
  while len(names) < n_vars:
    name = ''.join(rng.choices(string.ascii_uppercase, k=5))
    names += [name] * (name not in names)
  chains = []
  for c in range(p['num_chains']):
    v = names[c * (p['num_hops'] + 1):(c + 1) * (p['num_hops'] + 1)]
    chains.append([f'VAR {v[0]} = {rng.randint(10000, 99999)}'] +
                  [f'VAR {v[j + 1]} = VAR {v[j]}' for j in range(p['num_hops'])])
  sents = [NOISE] * size
  for chain in chains:
    at = (_insert_at(rng, size, len(chain), depth) if depth is not None else
          sorted(rng.sample(range(size + 1), len(chain))))
    for j, (i, statement) in enumerate(zip(at, chain)):
      sents.insert(i + j, statement)
  value = chains[0][0].split('=')[-1].strip()
  template, prefix, _ = TEMPLATES['vt']
  fill = dict(query=value, num_v=p['num_hops'] + 1)
  references = names[:p['num_hops'] + 1]
  return template.format(context='\n'.join(sents), **fill), prefix.format(**fill), references


def _cwe_list(rng, n_words, common_repeats, uncommon_repeats, num_cw):
  words = rng.sample(vocabulary(), n_words)
  common, uncommon = words[:num_cw], words[num_cw:]
  listed = common * common_repeats + uncommon * uncommon_repeats
  rng.shuffle(listed)
  return ' '.join(f'{i + 1}. {w}' for i, w in enumerate(listed)), common


def _cwe_text(rng, p, size, depth, length):
  del depth
  template, prefix, _ = TEMPLATES['cwe']
  # RULER: one solved example first; shorter lists and fewer repeats below 4096 tokens
  shot, main = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (p['freq_cw'],
                                                                          p['freq_ucw']))
  shot_list, shot_answer = _cwe_list(rng, *shot, p['num_cw'])
  context, common = _cwe_list(rng, size, *main, p['num_cw'])
  example = (template.format(context=shot_list) + prefix + ' ' +
             ' '.join(f'{i + 1}. {w}' for i, w in enumerate(shot_answer)))
  return example + '\n' + template.format(context=context), prefix, common


def _fwe_text(rng, p, size, depth):
  del depth
  vocab = set()
  while len(vocab) < 2000:
    vocab.add(''.join(rng.choices(string.ascii_lowercase, k=p['coded_wordlen'])))
  vocab = sorted(vocab)
  rng.shuffle(vocab)
  vocab[0] = '...'                                     # RULER: the top rank is noise
  k = np.arange(1, len(vocab) + 1)
  zeta = float(np.sum(np.arange(1, 10**6, dtype=np.float64) ** -p['alpha']))
  counts = (size * k ** -p['alpha'] / zeta).astype(int)
  words = [w for w, c in zip(vocab, counts) for _ in range(c)]
  rng.shuffle(words)
  template, prefix, _ = TEMPLATES['fwe']
  return template.format(context=' '.join(words)), prefix, vocab[1:4]


def _text(task, p, rng_seed, size, depth, length):
  rng = random.Random(rng_seed)
  kind = p['kind']
  if kind == 'niah':
    return _niah_text(rng, p, size, depth)
  if kind == 'vt':
    return _vt_text(rng, p, size, depth)
  if kind == 'cwe':
    return _cwe_text(rng, p, size, depth, length)
  if kind == 'fwe':
    return _fwe_text(rng, p, size, depth)
  raise ValueError(f'ruler: task {task!r} has unknown kind {kind!r}')


# --- fitting the length ---------------------------------------------------------------------

def _fits(task, p, seed, size, depth, length, tokenizer, new):
  text, prefix, refs = _text(task, p, seed, size, depth, length)
  ids = tokenizer.encode(text + prefix, bos=True)
  return len(ids) + new <= length, (text, prefix, refs, ids)


def _least(p):
  """The smallest haystack size: cwe lists its common words and one more."""
  return p['num_cw'] + 1 if p['kind'] == 'cwe' else 1


@functools.lru_cache(maxsize=256)
def _size(task, params_key, length, tokenizer, new):
  """The largest haystack size (sentences, words or list entries) whose example fits, found
  as RULER does: a binary search on one example (seed 0)."""
  p = dict(params_key)
  cap = len(vocabulary()) if p['kind'] == 'cwe' else 10**9   # cwe: the distinct words it has
  lo = _least(p)
  best = lo if _fits(task, p, 0, lo, 0.5, length, tokenizer, new)[0] else None
  hi = 2 * lo
  while best is not None and hi < cap and _fits(task, p, 0, hi, 0.5, length, tokenizer, new)[0]:
    best, lo, hi = hi, hi, hi * 2                    # grow the bracket
  hi = min(hi, cap) if best is not None else -1
  while lo <= hi:
    mid = (lo + hi) // 2
    if _fits(task, p, 0, mid, 0.5, length, tokenizer, new)[0]:
      best, lo = mid, mid + 1
    else:
      hi = mid - 1
  if best is None:
    raise ValueError(f'ruler {task}: length {length} is too short for its template and '
                     f'{new} generated tokens')
  return best


def example(task, length, tokenizer, seed, depth=None, max_new_tokens=None, **params):
  """Example `seed` of `task` in `length` tokens of `tokenizer` (data/hf_tokenizer.py);
  `params` override the task's (e.g. num_needle_k=8, num_hops=2)."""
  if task not in TASKS:
    raise ValueError(f'ruler: unknown task {task!r}; one of {sorted(TASKS)}')
  p = {**TASKS[task], **params}
  new = TEMPLATES['niah' if p['kind'] == 'niah' else p['kind']][2] if max_new_tokens is None \
      else max_new_tokens
  size = _size(task, tuple(sorted(p.items())), length, tokenizer, new)
  least = _least(p)
  while True:                        # as RULER: a smaller haystack if this draw is longer
    ok, (text, prefix, refs, ids) = _fits(task, p, seed, size, depth, length, tokenizer, new)
    if ok or size == least:
      break
    size = max(least, size - max(1, size // 50))
  if not ok:
    raise ValueError(f'ruler {task}: example {seed} does not fit {length} tokens')
  context = text[:text.rindex('\n')]              # every template asks after a newline
  question = len(ids) - len(tokenizer.encode(context, bos=True))
  return Example(task, length, text, prefix, list(refs), np.asarray(ids, np.int32), new, depth,
                 question)


def score(prediction, references):
  """RULER's string_match_all for one example: the fraction of `references` found in
  `prediction`, case-insensitive."""
  return sum(r.lower() in prediction.lower() for r in references) / len(references)


def filler_id(tokenizer):
  """The id prompts are aligned with (a newline), or None if a newline is not one token."""
  newline = tokenizer.encode('\n')
  return int(newline[0]) if len(newline) == 1 else None
