"""The direction of imports (DESIGN.md): configs, data and models at the bottom, training on
them, the CLIs and bench on top. Every import counts, those inside functions too."""
import ast
import os

from conftest import ROOT

PACKAGES = ('configs', 'data', 'models', 'training', 'bench')
CLIS = ('train', 'evaluate', 'evolve', 'export_hf')
# package -> packages it must never import
FORBIDDEN = {'models': ('training', 'configs', 'bench'), 'data': ('training', 'configs', 'bench')}


def project_modules():
  """{dotted module name: file path} of the packages and the CLIs."""
  mods = {cli: os.path.join(ROOT, cli + '.py') for cli in CLIS}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
      if 'results' in folder or '__pycache__' in folder:
        continue
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, '.')
          mods[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = (
              os.path.join(folder, f))
  return mods


def imports_of(path, mods):
  """Project modules imported anywhere in the file (module level and inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods else node.module
               for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in mods:        # import a.b.c of a package: its deepest module
        name = name.rpartition('.')[0]
      if name:
        out.add(name)
  return out


def graph():
  mods = project_modules()
  return {m: imports_of(p, mods) - {m} for m, p in mods.items()}


def test_no_import_cycles():
  g = graph()
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for n in sorted(g[m]):
      if state.get(n) == 'open':
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = 'done'

  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, '\n'.join(' -> '.join(c) for c in cycles)


def test_models_and_data_import_nothing_above_them():
  bad = [f'{m} imports {n}' for m, deps in graph().items() for n in deps
         if m.split('.')[0] in FORBIDDEN and n.split('.')[0] in FORBIDDEN[m.split('.')[0]]]
  assert not bad, '\n'.join(bad)


def test_the_checker_sees_function_level_imports(tmp_path):
  """The parser finds an import placed inside a function (a cycle hidden from import time)."""
  f = tmp_path / 'm.py'
  f.write_text('def g():\n  from training.loop import train\n  import models.lm\n')
  assert imports_of(str(f), project_modules()) == {'training.loop', 'models.lm'}
