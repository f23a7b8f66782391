"""What a ``.pt2`` archive may hold before torch is given it: proven inert, or refused.

``torch.export.load`` runs more than its unpickler. It ``exec``-s the
program's ``guards_code`` (at the first forward), passes every symbolic size
through ``sympy.sympify`` (an ``eval``), writes ``forward_arg_names`` into
the Python source of the module it builds, calls any ``torch.*``, ``math.*``
or ``operator.*`` callable a node names as its target, and falls back to a
full unpickle for members that weights-only loading refuses. A zip may also
hold two members of one name (Python's ``zipfile`` reads the last, torch the
first) or declare sizes far above its own.

So nothing reaches torch until:

- the archive is one folder of members of the names ``torch.export.save``
  writes, each name once, every member stored (uncompressed) inside the
  archive's bytes, the JSON members at most :data:`MAX_JSON_BYTES`;
- every JSON member parses, without duplicate keys, against torch's own
  serialization schema (``torch._export.serde.schema``) under rules of ours:
  an unknown key, a union member that carries code or objects (graphs,
  custom objects, operators as arguments), a ``guards_code`` entry other
  than an equality of two inputs' sizes (what a cut across a skip
  connection gets) or a string field without a rule is refused; names and dotted names must be
  identifiers; node targets must be ATen operators (not those that read
  files or print); symbolic expressions must parse by :func:`check_sym_expr`,
  a grammar of ours with no calls but a few integer functions;
- every ``torch.save`` member loads with ``weights_only=True``.
"""

import dataclasses
import enum
import functools
import io
import json
import re
import types
import typing
import zipfile

import torch

from .exceptions import SplitVerificationError

MAX_JSON_BYTES = 64 << 20  # a model.json is ~1.5 KB per graph node: 64 MiB is ~40,000 nodes

_MEMBER = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+|data/constants/model_constants_config\.json"
    r"|data/constants/tensor_\d+|data/(weights|constants|sample_inputs)/model\.pt)"  # model.pt: torch <= 2.8 archives
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]+")
_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
# ATen operators that reach outside the tensors they are given
_DENIED_OPS = {"from_file", "_print", "save", "load"}
_TEXT = re.compile(r"[^\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]*")  # no control characters but \t and \n
_VERIFIERS = {"TRAINING", "ATEN"}
_DEVICES = {"cpu", "cuda", "meta"}
_METADATA = {"stack_trace", "nn_module_stack", "torch_fn", "from_node", "custom"}
_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
_FLOAT_WORDS = {"Infinity", "-Infinity", "NaN"}  # how torch's serializer writes non-finite floats


class _Refused(Exception):
    """Raised inside the walk; turned into a SplitVerificationError naming the file and the path."""


# ---- symbolic expressions: a grammar of ours, parsed here before sympify ever sees them ----

_SYM_TOKEN = re.compile(r"\s*(?:(?P<int>-?[0-9]{1,19})|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^']{0,16}')|(?P<op>[(),=]))")
_SYM_FUNCTIONS = {"Add", "Mul", "FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "Max", "Min"}
_SYM_ASSUMPTIONS = {"positive", "integer", "nonnegative", "real", "finite"}
MAX_EXPR_CHARS = 1024


def check_sym_expr(text):
    """Refuse a symbolic size unless it is, in sympy's ``srepr`` form, made only of
    ``Symbol('s0', positive=True, ...)``, ``Integer(n)``, integers and
    ``Add``/``Mul``/``FloorDiv``/``Mod``/``Max``/``Min``/... of those: no
    attribute, no other name, no string but a symbol's name, no power."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise _Refused("a symbolic expression that is not a short string")
    tokens, at = [], 0
    while at < len(text):
        m = _SYM_TOKEN.match(text, at)
        if not m or m.end() == at:
            if text[at:].strip() == "":
                break
            raise _Refused(f"a symbolic expression outside the grammar: {text[:80]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        at = m.end()
    pos = 0

    def take(kind=None, value=None):
        nonlocal pos
        if pos >= len(tokens) or (kind and tokens[pos][0] != kind) or (value and tokens[pos][1] != value):
            raise _Refused(f"a symbolic expression outside the grammar: {text[:80]!r}")
        pos += 1
        return tokens[pos - 1][1]

    def expr(depth):
        if depth > 32:
            raise _Refused("a symbolic expression nested too deep")
        if pos < len(tokens) and tokens[pos][0] == "int":
            return take("int")
        word = take("word")
        take("op", "(")
        if word == "Symbol":
            if not _SYMBOL.fullmatch(take("str").strip("'")):
                raise _Refused(f"a symbol name outside the grammar in {text[:80]!r}")
            while pos < len(tokens) and tokens[pos][1] == ",":
                take("op", ",")
                if take("word") not in _SYM_ASSUMPTIONS:
                    raise _Refused(f"a symbol assumption outside the grammar in {text[:80]!r}")
                take("op", "=")
                if take("word") not in ("True", "False"):
                    raise _Refused(f"a symbol assumption outside the grammar in {text[:80]!r}")
        elif word == "Integer":
            take("int")
        elif word in _SYM_FUNCTIONS:
            expr(depth + 1)
            while pos < len(tokens) and tokens[pos][1] == ",":
                take("op", ",")
                expr(depth + 1)
        else:
            raise _Refused(f"the name {word!r} in a symbolic expression")
        take("op", ")")

    expr(0)
    if pos != len(tokens):
        raise _Refused(f"a symbolic expression outside the grammar: {text[:80]!r}")


# ---- the string fields of torch's schema, each with its rule; a field without one is refused ----


def _matching(pattern, what, empty_ok=False):
    """A rule: the whole string matches ``pattern`` (the empty string too when ``empty_ok``)."""
    def rule(value):
        if not (empty_ok and value == "") and not pattern.fullmatch(value):
            raise _Refused(f"{what} {value[:80]!r}")
    return rule


_name = _matching(_NAME, "the name, not an identifier,")
_dotted = _matching(_DOTTED, "the module path, not dotted identifiers,", empty_ok=True)
_symbol = _matching(_SYMBOL, "the symbol")
_payload_path = _matching(re.compile(r"(weight|tensor)_[0-9]+"), "the tensor file")


def _target(value):
    m = _TARGET.fullmatch(value)
    if not m or m.group(1) in _DENIED_OPS:
        raise _Refused(f"the node target {value[:80]!r}: only ATen tensor operators are allowed")


def _short_text(value):
    if len(value) > 256 or not _TEXT.fullmatch(value):
        raise _Refused(f"the string argument {value[:80]!r} (over 256 characters or with control characters)")


def _one_of(allowed):
    def rule(value):
        if value not in allowed:
            raise _Refused(f"the value {value[:80]!r} (allowed: {sorted(allowed)})")
    return rule


def _refuse(what):
    def rule(value):
        raise _Refused(what)
    return rule


# The one guard torch.export writes for a split: two inputs' sizes are equal (a cut across a skip connection sends
# several payload tensors of one batch size). torch pastes each guard into Python source it executes, so nothing but
# this exact form passes: input names are identifiers, dimensions small integers, no call but ``.size()``.
_SIZE = r"L\['[A-Za-z_][A-Za-z0-9_]{0,63}'\]\.size\(\)\[[0-9]{1,2}\]"
_GUARD = re.compile(f"{_SIZE} == {_SIZE}")


def _guard(value):
    if not _GUARD.fullmatch(value):
        raise _Refused("guards_code, Python source that loading would execute (other than an equality of two inputs' "
                       "sizes)")


def _version(value):
    if not re.fullmatch(r"[0-9A-Za-z.+_<=-]{1,64}", value):
        raise _Refused(f"the torch version {value[:80]!r}")


def _treespec(value):
    if len(value) > MAX_JSON_BYTES:
        raise _Refused("an oversized tree spec")
    try:
        spec = json.loads(value, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise _Refused("a tree spec that is not JSON") from None

    def walk(node, depth):
        if depth > 64:
            raise _Refused("a tree spec nested too deep")
        if isinstance(node, list):
            for item in node:
                walk(item, depth + 1)
        elif isinstance(node, dict):
            if "type" in node and node["type"] not in _TREESPEC_TYPES:
                raise _Refused(f"the tree spec type {str(node['type'])[:80]!r}")
            for item in node.values():
                walk(item, depth + 1)

    walk(spec, 0)


_STRING_RULES = {
    ("Device", "type"): _one_of(_DEVICES),
    ("SymExpr", "expr_str"): check_sym_expr,
    ("SymIntArgument", "as_name"): _name, ("SymFloatArgument", "as_name"): _name, ("SymBoolArgument", "as_name"): _name,
    ("TensorArgument", "name"): _name, ("TokenArgument", "name"): _name, ("NamedArgument", "name"): _name,
    ("Node", "name"): _name, ("Node", "target"): _target, ("InputToConstantInputSpec", "name"): _name,
    ("Argument", "as_string"): _short_text, ("Argument", "as_strings"): _short_text,
    ("ConstantValue", "as_string"): _short_text,
    ("Argument", "as_operator"): _refuse("an operator passed as an argument"),
    ("InputToParameterSpec", "parameter_name"): _dotted, ("InputToBufferSpec", "buffer_name"): _dotted,
    ("InputToTensorConstantSpec", "tensor_constant_name"): _dotted, ("BufferMutationSpec", "buffer_name"): _dotted,
    ("ParameterMutationSpec", "parameter_name"): _dotted, ("GradientToParameterSpec", "parameter_name"): _dotted,
    ("GradientToUserInputSpec", "user_input_name"): _name, ("UserInputMutationSpec", "user_input_name"): _name,
    ("ModuleCallSignature", "in_spec"): _treespec, ("ModuleCallSignature", "out_spec"): _treespec,
    ("ModuleCallSignature", "forward_arg_names"): _name, ("ModuleCallEntry", "fqn"): _dotted,
    ("ExportedProgram", "verifiers"): _one_of(_VERIFIERS), ("ExportedProgram", "torch_version"): _version,
    ("ExportedProgram", "guards_code"): _guard,
    ("PayloadMeta", "path_name"): _payload_path,
}
# union members and fields that carry code or objects: refused whatever their content
_REFUSED_FIELDS = {
    ("Argument", "as_graph"): "a subgraph argument (a higher-order operator)",
    ("Argument", "as_custom_obj"): "a custom object", ("InputSpec", "custom_obj"): "a custom object input",
    ("Argument", "as_string_to_argument"): "a dict argument",
    ("Graph", "custom_obj_values"): "custom object values", ("GraphModule", "treespec_namedtuple_fields"):
    "named-tuple definitions", ("GraphModule", "metadata"): "graph-module metadata",
}
# dict[str, ...] fields: what their keys must be
_KEY_RULES = {("Graph", "tensor_values"): _name, ("Graph", "sym_int_values"): _name,
              ("Graph", "sym_bool_values"): _name, ("Graph", "sym_float_values"): _name,
              ("ExportedProgram", "range_constraints"): _symbol,
              ("ExportedProgram", "opset_version"): _name, ("PayloadConfig", "config"): _dotted}


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Refused("a JSON object with a duplicate key")
    return dict(pairs)


def _metadata(value):
    """A node's ``metadata`` (dict of str to str): known keys, text without control characters, JSON where parsed."""
    if not isinstance(value, dict):
        raise _Refused("node metadata that is not an object")
    for key, text in value.items():
        if key not in _METADATA or not isinstance(text, str) or not _TEXT.fullmatch(text):
            raise _Refused(f"the node metadata {key[:40]!r}")
        if key in ("from_node", "custom"):
            try:
                json.loads(text, object_pairs_hook=_no_duplicates)
            except (ValueError, RecursionError):
                raise _Refused(f"node metadata {key!r} that is not JSON") from None


@functools.cache
def _fields(cls):
    """``(type hints, field names, is a union)`` of a schema dataclass."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    hints = typing.get_type_hints(cls, globalns=vars(schema), include_extras=True)
    return hints, {f.name for f in dataclasses.fields(cls)} - {"_type"}, issubclass(cls, _Union)


def _check(cls, value, where, depth=0):
    """``value`` (parsed JSON) against the schema type ``cls``; ``where`` = (class name, field) of a str."""
    if depth > 200:
        raise _Refused("JSON nested too deep")
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin is typing.Annotated:
        return _check(args[0], value, where, depth)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise _Refused(f"an ambiguous field {where}")
        return _check(inner[0], value, where, depth)
    if isinstance(cls, str):  # a forward reference
        from torch._export.serde import schema

        return _check(getattr(schema, cls), value, where, depth)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise _Refused(f"{cls.__name__} that is not an object")
        hints, fields, is_union = _fields(cls)
        if is_union and len(value) != 1:
            raise _Refused(f"{cls.__name__} with {len(value)} members (a union has one)")
        for key, item in value.items():
            if key not in fields:
                raise _Refused(f"the unknown field {cls.__name__}.{key}")
            field = (cls.__name__, key)
            if field in _REFUSED_FIELDS:
                if item in ({}, [], None):
                    continue
                raise _Refused(_REFUSED_FIELDS[field])
            if field == ("Node", "metadata"):
                _metadata(item)
                continue
            _check(hints[key], item, field, depth + 1)
        return
    if origin is list:
        if not isinstance(value, list):
            raise _Refused(f"{where[0]}.{where[1]} that is not a list")
        for item in value:
            _check(args[0], item, where, depth + 1)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise _Refused(f"{where[0]}.{where[1]} that is not an object")
        key_rule = _KEY_RULES.get(where)
        if key_rule is None and value:
            raise _Refused(f"entries in {where[0]}.{where[1]}")
        for key, item in value.items():
            key_rule(key)
            _check(args[1], item, where, depth + 1)
        return
    if cls is str:
        if not isinstance(value, str):
            raise _Refused(f"{where[0]}.{where[1]} that is not a string")
        rule = _STRING_RULES.get(where)
        if rule is None:
            raise _Refused(f"a string in {where[0]}.{where[1]}, a field this check has no rule for")
        rule(value)
        return
    if cls is bool:
        if not isinstance(value, bool):
            raise _Refused(f"{where[0]}.{where[1]} that is not a boolean")
        return
    if cls is int or (isinstance(cls, type) and issubclass(cls, enum.IntEnum)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Refused(f"{where[0]}.{where[1]} that is not an integer")
        if cls is not int and value not in {m.value for m in cls}:
            raise _Refused(f"{where[0]}.{where[1]} = {value}, not a {cls.__name__}")
        return
    if cls is float:
        if isinstance(value, str) and value in _FLOAT_WORDS:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Refused(f"{where[0]}.{where[1]} that is not a number")
        return
    raise _Refused(f"{where[0]}.{where[1]} of a type this check does not know ({cls!r})")


def _check_json(cls_name, data):
    from torch._export.serde import schema

    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused("a JSON member that does not parse") from None
    _check(getattr(schema, cls_name), document, (cls_name, ""))
    return document


def check_code_free_pt2(path, data):
    """Refuse the ``.pt2`` archive ``data`` (read from ``path``) unless it is proven inert (see the module)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise SplitVerificationError(f"{path} is not a .pt2 archive.") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if len(names) != len(set(names)):
            raise SplitVerificationError(f"{path} holds two members of one name, which zipfile and torch read "
                                         "differently; refusing it.")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise SplitVerificationError(f"{path} has several top-level folders {sorted(roots)}: not a .pt2 from save_split.")
        packed = next((i.filename for i in infos
                       if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size), None)
        if packed is not None:
            raise SplitVerificationError(f"{path}: {packed!r} is compressed, which torch.export.save never does; "
                                         "refusing it.")
        if sum(i.file_size for i in infos) > len(data):  # stored members overlapping one another
            raise SplitVerificationError(f"{path} declares more bytes than it holds (a zip bomb); refusing it.")
        for info in infos:
            name = info.filename
            member = name.split("/", 1)[1] if "/" in name else ""
            if not _MEMBER.fullmatch(member):
                raise SplitVerificationError(f"{path} holds an unexpected member {name!r}; refusing it.")
            if member.endswith(".json"):
                if info.file_size > MAX_JSON_BYTES:
                    raise SplitVerificationError(f"{path}: {name!r} is over {MAX_JSON_BYTES} bytes; refusing it.")
                kind = "ExportedProgram" if member == "models/model.json" else "PayloadConfig"
                try:
                    document = _check_json(kind, archive.read(name))
                except _Refused as exc:
                    raise SplitVerificationError(f"{path}: {name!r} holds {exc}; refusing it (loading could run "
                                                 "code). save_split writes none of that.") from None
                if kind == "PayloadConfig":
                    prefix = "weight_" if "/weights/" in member else "tensor_"
                    for entry, meta in document.get("config", {}).items():
                        if meta.get("use_pickle", False) or not str(meta.get("path_name", "")).startswith(prefix):
                            raise SplitVerificationError(
                                f"{path}: {entry!r} is stored as a pickle or a custom object, which loading would "
                                "execute; refusing it. save_split writes plain tensors only.")
            elif member.endswith(".pt"):  # torch.save archives (sample inputs)
                try:  # the restricted unpickler: no code; torch itself would fall back to a full unpickle
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:
                    raise SplitVerificationError(f"{path}: {name!r} needs more than weights-only loading, which "
                                                 "would run code; refusing it.") from None


def load_pt2(path, data):
    """The module of a ``.pt2`` program from its (verified) bytes, after :func:`check_code_free_pt2`."""
    check_code_free_pt2(path, data)
    return torch.export.load(io.BytesIO(data)).module()
