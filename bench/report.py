"""Folds the benchmark result pages (bench/results/*.md) into README.md's results section.

  python bench/report.py

Each bench script writes its own bench/results/NAME.md (tables + the exact command that
produced them, with machine, versions and seeds); this replaces the text between the
README's `<!-- results:start -->` and `<!-- results:end -->` markers by those pages in
ORDER (then any others), so the README never carries hand-typed numbers.
"""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ['foundation', 'run', 'run_quick', 'titans', 'infini', 'anchor_prose', 'anchor',
         'anchor_2layer', 'namm', 'hf']
START, END = '<!-- results:start -->', '<!-- results:end -->'


def demote(text, top=3):
  """Shifts a page's headings so its highest one is level `top` (code blocks untouched)."""
  lines, fenced = text.splitlines(), False
  levels = []
  for line in lines:
    fenced ^= line.startswith('```')
    if not fenced and line.startswith('#'):
      levels.append(len(line) - len(line.lstrip('#')))
  shift = top - min(levels) if levels else 0
  out, fenced = [], False
  for line in lines:
    fenced ^= line.startswith('```')
    if not fenced and line.startswith('#') and not line.startswith('```'):
      level = len(line) - len(line.lstrip('#'))
      line = '#' * min(level + shift, 6) + line[level:]
    out.append(line)
  return '\n'.join(out)


def pages():
  found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, 'bench/results/*.md'))}
  names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
  for name in names:
    with open(found[name]) as f:
      text = f.read().strip()
    png = found[name][:-3] + '.png'
    if os.path.exists(png) and '.png' not in text:
      text += f'\n\n![{name}](bench/results/{name}.png)'
    yield demote(text)


def main():
  path = os.path.join(ROOT, 'README.md')
  with open(path) as f:
    readme = f.read()
  if START not in readme or END not in readme:
    raise SystemExit(f'README.md has no {START} ... {END} section')
  head, rest = readme.split(START, 1)
  _, tail = rest.split(END, 1)
  body = '\n\n'.join(pages())
  with open(path, 'w') as f:
    f.write(f'{head}{START}\n{body}\n{END}{tail}')
  print(f'README.md results section: {body.count(chr(10)) + 1} lines from bench/results/')


if __name__ == '__main__':
  main()
