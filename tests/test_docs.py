"""The commands the README and the scripts' docstrings give to copy name options that exist, with
values of the right type: a key renamed or removed in the code fails here, not in a reader's
terminal. Nothing is run; each command goes through the parsing its script does."""
import ast
import os
import re
import shlex

import pytest

import common
import eval as E
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = common.METHODS + ('eval',)


def texts():
    """(file, text): the README, and the module docstring of every script."""
    yield 'README.md', open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    for name in SCRIPTS:
        source = open(os.path.join(ROOT, f'{name}.py'), encoding='utf-8').read()
        yield f'{name}.py', ast.get_docstring(ast.parse(source))


def commands():
    """(file, line, script, args) of every `python X.py ...` and `torchrun ... X.py ...` in a text, with
    line continuations joined and shell comments, [optional] brackets and what follows `;` dropped;
    the README's seed loop variable becomes a seed and `<method>.py` or `$m.py` stands for each method."""
    out = []
    for where, text in texts():
        for line in text.replace('\\\n', ' ').splitlines():
            for m in re.finditer(r'(?:python|torchrun(?: --[\w=]+)*) (\w+|<method>|\$m)\.py\b([^;#&`]*)', line):
                command = ' '.join(m.groups()).replace('[', ' ').replace(']', ' ').replace('$s', '0')
                command = command.replace('$m', '<method>')
                for method in common.METHODS if '<method>' in command else ['']:
                    script, *args = shlex.split(command.replace('<method>', method))
                    out.append((where, line.strip(), script, [a for a in args if a not in ('-h', '--help')]))
    return out


def check(script, args, monkeypatch):
    """A UserError where the script would refuse these arguments."""
    if script == 'eval':
        return check_eval(args, monkeypatch)
    module = common.import_method(script)
    if common._parse_argv(args, module.config).get('preset', 'auto') not in ('auto', *module.PRESETS):
        raise UserError(f'unknown --preset in {args}')


def check_eval(args, monkeypatch):
    """eval.py's own main() on these arguments, with what it would load or run replaced by checks."""
    monkeypatch.setattr(E, 'compare', lambda root: None)
    monkeypatch.setattr(E, 'predict', lambda ckpt, image, out='', argv=(): inference_keys(ckpt, argv, category=''))
    monkeypatch.setattr(E, 'bench', lambda method, argv: check(method, [a for a in argv if a != '--networks_only'],
                                                               monkeypatch))
    monkeypatch.setattr(E, 'bench_metrics', lambda: None)
    monkeypatch.setattr(E, 'baselines', lambda cfg: {})          # run_baselines parses, then computes nothing
    monkeypatch.setattr(E, 'evaluate_checkpoint', inference_keys)
    E.main(args)


def inference_keys(path, argv, **own):
    """CKPT [keys]: the keys its method's checkpoint may take (INFER_KEYS and run-time keys, and own: the
    command's options); the run folder names the method (out/<method>_...), out/<run> may be any."""
    folders = path.split('/')
    methods = [m for m in common.METHODS if any(f.startswith(m + '_') for f in folders)] or common.METHODS
    errors = []
    for method in methods:
        module = common.import_method(method)
        try:
            keys = module.Model.INFER_KEYS + common.RUNTIME_KEYS
            return common._parse_argv(argv, {**{k: module.config[k] for k in keys}, **own})
        except UserError as e:
            errors.append(f'{method}: {e}')
    raise UserError('; '.join(errors))


COMMANDS = commands()


def test_the_docs_hold_commands_of_every_script():
    """The extraction itself: a regex that found nothing would pass every check below."""
    found = {(where, script) for where, _, script, _ in COMMANDS}
    for name in SCRIPTS:
        assert ('README.md', name) in found, name
        assert (f'{name}.py', name) in found or (f'{name}.py', 'eval') in found, name
    assert len(COMMANDS) > 40


def test_documented_commands_parse(monkeypatch):
    failed = []
    for where, line, script, args in COMMANDS:
        try:
            check(script, args, monkeypatch)
        except UserError as e:
            failed.append(f'{where}: {line}\n  {e}')
    assert not failed, '\n'.join(failed)


def section_flags():
    """(method, flag) for every --flag in backticks in a method's section of the README (`--steps`,
    `--block 2 --ch 32`), which flags that method or eval.py must know."""
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    out = []
    for section in re.split(r'\n(?=##)', readme):
        m = re.match(r'### .*\(`(\w+)\.py`\)', section)
        for span in re.findall(r'`([^`\n]*--[^`\n]*)`', section) if m else ():
            out += [(m[1], flag) for flag in re.findall(r'(?<![\w-])--(\w+)', span)]
    return out


def test_flags_in_method_sections_exist():
    flags = section_flags()
    assert len({m for m, _ in flags}) == len(common.METHODS)        # every section was found
    eval_only = ('compare', 'predict', 'bench', 'baselines', 'networks_only', 'help')
    unknown = [(m, f) for m, f in flags
               if f not in common.import_method(m).config and f not in eval_only]
    assert not unknown, unknown


def test_a_stale_option_fails_the_check(monkeypatch):
    """The checks bite: a documented key that a script no longer has is reported, for the script
    itself and for eval.py's inference keys."""
    module = common.import_method('omiad')
    ckpt = ['out/omiad_synthetic_all_tiny_s0/ckpt.pt', '--teacher_steps', '10']
    check('omiad', ['--teacher_steps', '10'], monkeypatch)
    check('eval', ckpt, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(module.Model, 'INFER_KEYS', ('use_teacher', 'score_kernel', 't_init'))
        with pytest.raises(UserError, match='unknown option --teacher_steps'):
            check('eval', ckpt, monkeypatch)
    monkeypatch.delitem(module.config, 'teacher_steps')
    with pytest.raises(UserError, match='unknown option --teacher_steps'):
        check('omiad', ['--teacher_steps', '10'], monkeypatch)
    with pytest.raises(UserError, match='--preset'):
        check('omiad', ['--preset', 'huge'], monkeypatch)
