"""In-process search engine plug-in for ``argilla-server`` 2.8.

argilla-server keeps its data in SQL (SQLite here) and delegates record search,
filtering, sorting, vector similarity and progress metrics to a pluggable
``SearchEngine`` (Elasticsearch/OpenSearch upstream).  Neither can be installed
in this project's environments, so this module implements the same contract
with the documents held in process memory.  It mirrors the semantics of
``argilla_server.search_engine.commons.BaseElasticAndOpenSearchEngine``:

* one "index" per dataset; a record is indexed as a document holding its
  fields, metadata, suggestions (by question name), responses and vectors
  (keyed by vector-settings id);
* ``search``: ``simple_query_string``-like text query (default operator AND,
  ``|`` or, ``-`` not, ``"phrases"``, ``prefix*``, ``term~N`` fuzzy,
  parentheses) over all text fields or one field; terms/range filters on
  metadata, suggestions, responses (incl. ``pending`` status) and record
  properties; multi-key sort with missing values last; pagination; per-user
  deterministic random order (the UI's annotation queue);
* ``similarity_search``: exact cosine k-NN, score ``(1 + cos) / 2`` like ES;
* metadata metrics, dataset progress and per-user progress.

Nothing is persisted: the SQL database is the source of truth and
``services/argilla/app.py`` rebuilds the indexes from it at start-up.

Select it with ``ARGILLA_SEARCH_ENGINE=inmemory`` and make sure this module is
imported before the app starts (``app.py`` does that).  It must run with a
single worker process: every worker would hold its own copy of the index.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import threading
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union
from uuid import UUID

import numpy as np
from argilla_server.enums import MetadataPropertyType, SimilarityOrder, SortOrder
from argilla_server.models import Dataset, MetadataProperty, Record, Response, Suggestion, User, VectorSettings
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

ENGINE_NAME = "inmemory"

__all__ = ["ENGINE_NAME", "InMemorySearchEngine"]


# --------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """Enum -> its value; everything else unchanged."""
    return value.value if isinstance(value, Enum) else value


def _flatten(value: Any) -> List[Any]:
    """A multi-valued field as a list (ES treats arrays as "any of")."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        out: List[Any] = []
        for item in value:
            out.extend(_flatten(item))
        return out
    return [_plain(value)]


def _epoch_millis(value: datetime) -> float:
    if value.tzinfo is None:  # argilla stores naive UTC datetimes
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp() * 1000.0


def _as_number(value: Any) -> Optional[float]:
    """Numeric view of a value for range filters / sorting (dates as epoch millis, like ES)."""
    value = _plain(value)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return _epoch_millis(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return _epoch_millis(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _term_equals(doc_value: Any, filter_value: Any) -> bool:
    doc_value, filter_value = _plain(doc_value), _plain(filter_value)
    if isinstance(doc_value, bool) or isinstance(filter_value, bool):
        return str(doc_value).lower() == str(filter_value).lower()
    if isinstance(doc_value, (int, float)) or isinstance(filter_value, (int, float)):
        a, b = _as_number(doc_value), _as_number(filter_value)
        if a is not None and b is not None:
            return a == b
    if isinstance(doc_value, (dict, list)):
        return False
    return str(doc_value) == str(filter_value)


def _in_range(value: Any, ge: Any, le: Any) -> bool:
    number = _as_number(value)
    if number is None:
        return False
    if ge is not None:
        low = _as_number(ge)
        if low is None or number < low:
            return False
    if le is not None:
        high = _as_number(le)
        if high is None or number > high:
            return False
    return True


def _sort_key(value: Any) -> Tuple[int, Any]:
    number = _as_number(value) if not isinstance(value, str) else None
    if number is not None:
        return (0, number)
    return (1, str(value))


def _user_random(user_id: Any, record_id: str) -> float:
    """Deterministic per-user pseudo random number in [0, 1) (ES ``random_score`` with a seed)."""
    digest = hashlib.blake2b(f"{user_id}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# --------------------------------------------------------------------------- text search

_TOKEN_RE = re.compile(r"\w+(?:['\u2019]\w+)*")


def analyze(text: Any) -> List[str]:
    """Roughly the ES ``standard`` analyzer: unicode word tokens, lower-cased."""
    if text is None:
        return []
    return _TOKEN_RE.findall(str(text).lower())


def _levenshtein_at_most(a: str, b: str, limit: int) -> bool:
    if abs(len(a) - len(b)) > limit:
        return False
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
        if min(current) > limit:
            return False
        previous = current
    return previous[-1] <= limit


class _QueryNode:
    kind: str  # "term" | "phrase" | "and" | "or" | "not" | "all"

    def __init__(self, kind: str, **kw: Any):
        self.kind = kind
        self.__dict__.update(kw)


_QUERY_LEX = re.compile(r'\s+|"(?:\\.|[^"\\])*"?(?:~\d+)?|[()|+]|-(?=\S)|(?:\\.|[^\s()|"\\])+')


def parse_simple_query_string(query: str) -> _QueryNode:
    """Parse the subset of ES ``simple_query_string`` syntax argilla's UI and SDK send.

    Grammar: ``or := and ('|' and)*``, ``and := unary ('+'? unary)*`` (default operator AND),
    ``unary := '-' unary | primary``, ``primary := '(' or ')' | "phrase" | term[*|~N]``.
    """
    tokens = [t for t in _QUERY_LEX.findall(query) if t and not t.isspace()]
    pos = 0

    def peek() -> Optional[str]:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def parse_or() -> _QueryNode:
        parts = [parse_and()]
        while peek() == "|":
            take()
            parts.append(parse_and())
        parts = [p for p in parts if p is not None]
        if not parts:
            return None  # type: ignore[return-value]
        return parts[0] if len(parts) == 1 else _QueryNode("or", parts=parts)

    def parse_and() -> Optional[_QueryNode]:
        parts = []
        while peek() is not None and peek() not in ("|", ")"):
            if peek() == "+":
                take()
                continue
            node = parse_unary()
            if node is not None:
                parts.append(node)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else _QueryNode("and", parts=parts)

    def parse_unary() -> Optional[_QueryNode]:
        if peek() == "-":
            take()
            if peek() is None or peek() in ("|", ")"):
                return None
            inner = parse_unary()
            return _QueryNode("not", part=inner) if inner is not None else None
        return parse_primary()

    def parse_primary() -> Optional[_QueryNode]:
        if peek() is None:
            return None
        token = take()
        if token == "(":
            inner = parse_or()
            if peek() == ")":
                take()
            return inner
        if token == ")":
            return None
        if token.startswith('"'):
            body = re.sub(r"~\d+$", "", token)
            body = body[1:-1] if body.endswith('"') and len(body) > 1 else body[1:]
            words = analyze(body.replace("\\", ""))
            return _QueryNode("phrase", words=words) if words else None
        fuzzy = 0
        match = re.search(r"~(\d*)$", token)
        if match:
            fuzzy = min(int(match.group(1) or 2), 2)
            token = token[: match.start()]
        prefix = token.endswith("*") and not token.endswith("\\*")
        if prefix:
            token = token[:-1]
        words = analyze(token.replace("\\", ""))
        if not words:
            return None
        if len(words) == 1:
            return _QueryNode("term", word=words[0], prefix=prefix, fuzzy=fuzzy)
        # "foo-bar" -> all of its tokens, the last one may be a prefix
        return _QueryNode(
            "and",
            parts=[
                _QueryNode("term", word=w, prefix=prefix and i == len(words) - 1, fuzzy=fuzzy)
                for i, w in enumerate(words)
            ],
        )

    node = parse_or() if tokens else None
    while pos < len(tokens):  # unbalanced ")": keep going with the rest
        take()
        rest = parse_or()
        if rest is not None:
            node = rest if node is None else _QueryNode("and", parts=[node, rest])
    return node if node is not None else _QueryNode("all")


class _TextMatcher:
    """Evaluates a parsed query against documents' token sequences with a tf-idf score."""

    def __init__(self, node: _QueryNode, field: Optional[str], docs: List[dict]):
        self.node = node
        self.field = field
        total = max(len(docs), 1)
        self._idf_cache: Dict[Tuple[str, bool, int], float] = {}
        self._docs = docs
        self._total = total

    def _sequences(self, doc: dict) -> List[List[str]]:
        text = doc["_text"]
        if self.field is not None:
            return text.get(self.field, [])
        return [seq for seqs in text.values() for seq in seqs]

    @staticmethod
    def _word_matches(node: _QueryNode, token: str) -> bool:
        if node.prefix:
            return token.startswith(node.word)
        if node.fuzzy:
            return token == node.word or _levenshtein_at_most(token, node.word, node.fuzzy)
        return token == node.word

    def _idf(self, node: _QueryNode) -> float:
        key = (node.word, node.prefix, node.fuzzy)
        if key not in self._idf_cache:
            df = sum(
                1
                for doc in self._docs
                if any(self._word_matches(node, t) for seq in self._sequences(doc) for t in seq)
            )
            self._idf_cache[key] = math.log(1.0 + (self._total - df + 0.5) / (df + 0.5))
        return self._idf_cache[key]

    def match(self, doc: dict) -> Tuple[bool, float]:
        return self._eval(self.node, self._sequences(doc))

    def _eval(self, node: _QueryNode, seqs: List[List[str]]) -> Tuple[bool, float]:
        kind = node.kind
        if kind == "all":
            return True, 1.0
        if kind == "term":
            tf = sum(1 for seq in seqs for t in seq if self._word_matches(node, t))
            if not tf:
                return False, 0.0
            return True, (1.0 + math.log(tf)) * self._idf(node)
        if kind == "phrase":
            words, n, hits = node.words, len(node.words), 0
            for seq in seqs:
                for i in range(len(seq) - n + 1):
                    if seq[i : i + n] == words:
                        hits += 1
            if not hits:
                return False, 0.0
            return True, (1.0 + math.log(hits)) * n
        if kind == "not":
            matched, _ = self._eval(node.part, seqs)
            return (not matched), 0.0
        if kind == "and":
            score = 0.0
            for part in node.parts:
                matched, part_score = self._eval(part, seqs)
                if not matched:
                    return False, 0.0
                score += part_score
            return True, score
        if kind == "or":
            any_match, score = False, 0.0
            for part in node.parts:
                matched, part_score = self._eval(part, seqs)
                if matched:
                    any_match, score = True, score + part_score
            return any_match, score
        raise ValueError(f"unknown query node {kind}")


# --------------------------------------------------------------------------- storage


class _Index:
    def __init__(self) -> None:
        self.docs: Dict[str, dict] = {}
        self.field_types: Dict[str, str] = {}
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class _Store:
    """Process-wide state: ``SearchEngine.get_by_name`` builds a new engine object per request."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.indexes: Dict[str, _Index] = {}
        self.record_dataset: Dict[str, str] = {}

    def index(self, dataset_id: Any, create: bool = True) -> Optional[_Index]:
        key = str(dataset_id)
        index = self.indexes.get(key)
        if index is None and create:
            index = self.indexes[key] = _Index()
        return index

    def doc(self, record_id: Any) -> Optional[dict]:
        dataset_id = self.record_dataset.get(str(record_id))
        if dataset_id is None:
            return None
        index = self.indexes.get(dataset_id)
        return index.docs.get(str(record_id)) if index else None

    def clear(self) -> None:
        with self.lock:
            self.indexes.clear()
            self.record_dataset.clear()


STORE = _Store()


def _field_type(field: Any) -> str:
    if field.is_image:
        return "image"
    if field.is_chat:
        return "chat"
    if field.is_custom:
        return "custom"
    return "text"


def _field_sequences(kind: str, value: Any) -> List[List[str]]:
    if value is None or kind == "image":
        return []
    if kind == "chat" and isinstance(value, list):
        return [analyze(m.get("content")) for m in value if isinstance(m, dict)]
    return [analyze(value)]


def _response_to_doc(response: Response) -> dict:
    return {
        "id": str(response.id),
        "status": _plain(response.status),
        "user_id": str(response.user_id),
        "values": {q: copy.deepcopy((v or {}).get("value")) for q, v in (response.values or {}).items()},
    }


def _suggestion_to_doc(suggestion: Suggestion) -> dict:
    return {
        "type": _plain(suggestion.type),
        "agent": suggestion.agent,
        "score": copy.deepcopy(suggestion.score),
        "value": copy.deepcopy(suggestion.value),
    }


# --------------------------------------------------------------------------- engine


@SearchEngine.register(engine_name=ENGINE_NAME)
class InMemorySearchEngine(SearchEngine):
    """See the module docstring. Instances are cheap views on the process-wide ``STORE``."""

    def __init__(self, store: _Store = STORE):
        self._store = store

    @classmethod
    async def new_instance(cls) -> "InMemorySearchEngine":
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        return True

    async def info(self) -> dict:
        with self._store.lock:
            return {
                "name": ENGINE_NAME,
                "version": {"number": "2.8.0", "distribution": ENGINE_NAME},
                "indexes": len(self._store.indexes),
                "documents": len(self._store.record_dataset),
            }

    # ---------------------------------------------------------------- index management

    async def create_index(self, dataset: Dataset):
        with self._store.lock:
            self._drop(dataset.id)
            index = self._store.index(dataset.id)
            self._remember_field_types(index, dataset)

    async def delete_index(self, dataset: Dataset):
        with self._store.lock:
            self._drop(dataset.id)

    def _drop(self, dataset_id: Any) -> None:
        index = self._store.indexes.pop(str(dataset_id), None)
        if index:
            for record_id in index.docs:
                self._store.record_dataset.pop(record_id, None)

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        # Documents keep every metadata value, so nothing has to be mapped.
        with self._store.lock:
            self._store.index(dataset.id)

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    @staticmethod
    def _remember_field_types(index: _Index, dataset: Dataset) -> None:
        try:
            fields = list(dataset.fields)
        except Exception:  # relationship not loaded: keep what we know
            return
        for field in fields:
            index.field_types[field.name] = _field_type(field)

    # ---------------------------------------------------------------- documents

    def _record_to_doc(self, index: _Index, record: Record) -> dict:
        raw_fields = record.fields or {}
        fields: Dict[str, Any] = {}
        text: Dict[str, List[List[str]]] = {}
        names = list(index.field_types) or list(raw_fields)
        for name in names:
            kind = index.field_types.get(name, "text")
            if kind == "image":
                continue
            value = raw_fields.get(name)
            if kind == "custom" and value is not None:
                value = str(value)
            fields[name] = copy.deepcopy(value)
            text[name] = _field_sequences(kind, value)

        doc = {
            "id": str(record.id),
            "external_id": record.external_id,
            "status": _plain(record.status),
            "inserted_at": record.inserted_at,
            "updated_at": record.updated_at,
            "fields": fields,
            "metadata": copy.deepcopy(dict(record.metadata_ or {})),
            "responses": [_response_to_doc(r) for r in (record.responses or [])],
            "suggestions": {s.question.name: _suggestion_to_doc(s) for s in (record.suggestions or [])},
            "vectors": {
                str(v.vector_settings_id): np.asarray(v.value, dtype=np.float64) for v in (record.vectors or [])
            },
            "_text": text,
        }
        return doc

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        records = list(records)
        with self._store.lock:
            index = self._store.index(dataset.id)
            self._remember_field_types(index, dataset)
            for record in records:
                doc = self._record_to_doc(index, record)
                previous = index.docs.get(doc["id"])
                doc["_seq"] = previous["_seq"] if previous else index.next_seq()
                index.docs[doc["id"]] = doc
                self._store.record_dataset[doc["id"]] = str(dataset.id)

    async def partial_record_update(self, record: Record, **update):
        with self._store.lock:
            doc = self._store.doc(record.id)
            if doc is None:
                return
            for key, value in update.items():
                if key == "metadata":
                    doc["metadata"] = copy.deepcopy(dict(value or {}))
                elif key in ("fields", "responses", "suggestions", "vectors", "_text", "_seq"):
                    continue  # whole-document changes go through index_records
                else:
                    doc[key] = _plain(value)

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        with self._store.lock:
            index = self._store.index(dataset.id, create=False)
            for record in records:
                record_id = str(record.id)
                if index is not None:
                    index.docs.pop(record_id, None)
                self._store.record_dataset.pop(record_id, None)

    async def update_record_response(self, response: Response):
        with self._store.lock:
            doc = self._store.doc(response.record_id)
            if doc is None:
                return
            mapped = _response_to_doc(response)
            doc["responses"] = [r for r in doc["responses"] if r["id"] != mapped["id"]] + [mapped]

    async def delete_record_response(self, response: Response):
        with self._store.lock:
            doc = self._store.doc(response.record_id)
            if doc is not None:
                doc["responses"] = [r for r in doc["responses"] if r["id"] != str(response.id)]

    async def update_record_suggestion(self, suggestion: Suggestion):
        with self._store.lock:
            doc = self._store.doc(suggestion.record_id)
            if doc is not None:
                doc["suggestions"][suggestion.question.name] = _suggestion_to_doc(suggestion)

    async def delete_record_suggestion(self, suggestion: Suggestion):
        with self._store.lock:
            doc = self._store.doc(suggestion.record_id)
            if doc is not None:
                doc["suggestions"].pop(suggestion.question.name, None)

    # ---------------------------------------------------------------- metrics

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        with self._store.lock:
            index = self._store.index(dataset.id, create=False)
            docs = list(index.docs.values()) if index else []
            counts: Dict[str, int] = {}
            for doc in docs:
                counts[doc["status"]] = counts.get(doc["status"], 0) + 1
            return {"total": len(docs), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        user_id = str(user.id)
        with self._store.lock:
            index = self._store.index(dataset.id, create=False)
            counts: Dict[str, int] = {}
            total = 0
            for doc in index.docs.values() if index else []:
                for response in doc["responses"]:
                    if response["user_id"] == user_id:
                        total += 1
                        counts[response["status"]] = counts.get(response["status"], 0) + 1
            return {"total": total, **counts}

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        name = metadata_property.name
        with self._store.lock:
            index = self._store.index(metadata_property.dataset_id, create=False)
            per_doc = [_flatten(doc["metadata"].get(name)) for doc in (index.docs.values() if index else [])]

        if metadata_property.type == MetadataPropertyType.terms:
            total = sum(len(values) for values in per_doc)
            doc_counts: Dict[str, int] = {}
            for values in per_doc:
                for term in {str(v) for v in values}:
                    doc_counts[term] = doc_counts.get(term, 0) + 1
            buckets = sorted(doc_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            return TermsMetrics(
                total=total, values=[TermsMetrics.TermCount(term=t, count=c) for t, c in buckets] if total else []
            )

        numbers = [n for values in per_doc for n in (_as_number(v) for v in values) if n is not None]
        if metadata_property.type == MetadataPropertyType.integer:
            return IntegerMetadataMetrics(
                min=int(min(numbers)) if numbers else None, max=int(max(numbers)) if numbers else None
            )
        return FloatMetadataMetrics(min=min(numbers) if numbers else None, max=max(numbers) if numbers else None)

    # ---------------------------------------------------------------- filters & sort

    def _scope_values(self, doc: dict, scope: Any) -> List[Any]:
        if isinstance(scope, MetadataFilterScope):
            return _flatten(doc["metadata"].get(scope.metadata_property))
        if isinstance(scope, SuggestionFilterScope):
            return _flatten(doc["suggestions"].get(scope.question, {}).get(str(scope.property)))
        if isinstance(scope, RecordFilterScope):
            return _flatten(doc.get(str(_plain(scope.property))))
        raise ValueError(f"Cannot process request for search scope {scope}")

    def _matches(self, doc: dict, filter: Filter) -> bool:
        if isinstance(filter, AndFilter):
            return all(self._matches(doc, f) for f in filter.filters)
        if isinstance(filter.scope, ResponseFilterScope):
            return self._matches_response_filter(doc, filter)
        return self._matches_values(self._scope_values(doc, filter.scope), filter)

    @staticmethod
    def _matches_values(values: List[Any], filter: Filter) -> bool:
        if isinstance(filter, TermsFilter):
            return any(_term_equals(v, fv) for v in values for fv in filter.values)
        if isinstance(filter, RangeFilter):
            return any(_in_range(v, filter.ge, filter.le) for v in values)
        raise ValueError(f"Cannot process request for filter {filter}")

    def _matches_response_filter(self, doc: dict, filter: Filter) -> bool:
        scope: ResponseFilterScope = filter.scope
        user_id = str(scope.user.id) if scope.user is not None else None
        responses = [r for r in doc["responses"] if user_id is None or r["user_id"] == user_id]

        if scope.question:
            return any(self._matches_values(_flatten(r["values"].get(scope.question)), filter) for r in responses)

        if scope.property == "status" and isinstance(filter, TermsFilter):
            statuses = {str(_plain(v)) for v in filter.values}
            if "pending" in statuses:
                # ES: no response (of this user, when the filter is for a user)
                if not responses:
                    return True
                statuses.discard("pending")
            return any(r["status"] in statuses for r in responses)

        raise ValueError(f"Cannot process filter scope {scope}")

    def _order_value(self, doc: dict, order: Order) -> Optional[Tuple[int, Any]]:
        scope = order.scope
        descending = _plain(order.order) == SortOrder.desc.value
        if isinstance(scope, ResponseFilterScope):
            user_id = str(scope.user.id) if scope.user is not None else None
            values: List[Any] = []
            for response in doc["responses"]:
                if user_id is not None and response["user_id"] != user_id:
                    continue
                if scope.question:
                    values.extend(_flatten(response["values"].get(scope.question)))
                else:
                    values.extend(_flatten(response.get(str(scope.property))))
            numbers = [_as_number(v) for v in values if not isinstance(v, str)]
            numbers = [n for n in numbers if n is not None]
            if numbers and len(numbers) == len(values):
                return (0, sum(numbers) / len(numbers))  # ES "mode": "avg"
        else:
            values = self._scope_values(doc, scope)
        keys = [_sort_key(v) for v in values if not isinstance(v, (dict, list))]
        if not keys:
            return None
        return max(keys) if descending else min(keys)  # ES default sort mode for arrays

    def _sort(self, docs: List[dict], sort: List[Order]) -> List[dict]:
        docs = sorted(docs, key=lambda d: d["_seq"])
        for order in reversed(sort):
            descending = _plain(order.order) == SortOrder.desc.value
            keyed = [(self._order_value(doc, order), doc) for doc in docs]
            present = [kd for kd in keyed if kd[0] is not None]
            missing = [doc for key, doc in keyed if key is None]
            present.sort(key=lambda kd: kd[0], reverse=descending)
            docs = [doc for _, doc in present] + missing  # missing values last, like ES
        return docs

    def _text_matcher(self, index: _Index, docs: List[dict], query: Optional[Union[TextQuery, str]]):
        if query is None:
            return None
        if isinstance(query, str):
            query = TextQuery(q=query)
        if query.field and index.field_types and query.field not in index.field_types:
            raise Exception(f"Field {query.field} not found in dataset")
        return _TextMatcher(parse_simple_query_string(query.q), query.field or None, docs)

    def _candidates(
        self, dataset: Dataset, query: Optional[Union[TextQuery, str]], filter: Optional[Filter]
    ) -> List[Tuple[dict, float]]:
        index = self._store.index(dataset.id, create=False)
        if index is None:
            return []
        docs = list(index.docs.values())
        if filter is not None:
            docs = [doc for doc in docs if self._matches(doc, filter)]
        matcher = self._text_matcher(index, list(index.docs.values()), query)
        if matcher is None:
            return [(doc, 1.0) for doc in docs]
        result = []
        for doc in docs:
            matched, score = matcher.match(doc)
            if matched:
                result.append((doc, score))
        return result

    # ---------------------------------------------------------------- search

    async def search(
        self,
        dataset: Dataset,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        sort: Optional[List[Order]] = None,
        offset: int = 0,
        limit: int = 100,
        user_id: Optional[Union[str, UUID]] = None,
    ) -> SearchResponses:
        with self._store.lock:
            hits = self._candidates(dataset, query, filter)
            if sort:
                ordered = self._sort([doc for doc, _ in hits], sort)
                items = [(doc, None) for doc in ordered]
            else:
                if user_id is not None:  # ES function_score random_score(seed=user), boost_mode multiply
                    hits = [(doc, score * _user_random(user_id, doc["id"])) for doc, score in hits]
                items = sorted(hits, key=lambda ds: (-ds[1], ds[0]["_seq"]))
            page = items[offset : offset + limit] if limit is not None else items[offset:]
            return SearchResponses(
                items=[SearchResponseItem(record_id=UUID(doc["id"]), score=score) for doc, score in page],
                total=len(items),
            )

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: Optional[List[float]] = None,
        record: Optional[Record] = None,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: Optional[float] = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")

        key = str(vector_settings.id)
        excluded_id = None
        with self._store.lock:
            vector_value = value
            if not vector_value:
                excluded_id = str(record.id)
                doc = self._store.doc(record.id)
                if doc is not None and key in doc["vectors"]:
                    vector_value = doc["vectors"][key]
                else:
                    vector_value = record.vector_value_by_vector_settings(vector_settings)
            if vector_value is None or len(vector_value) == 0:
                raise ValueError("Cannot find a vector value to apply with provided info")

            target = np.asarray(vector_value, dtype=np.float64)
            if _plain(order) == SimilarityOrder.least_similar.value:
                target = -target

            candidates = [
                doc
                for doc, _ in self._candidates(dataset, query, filter)
                if doc["id"] != excluded_id and key in doc["vectors"] and doc["vectors"][key].shape == target.shape
            ]
            if not candidates:
                return SearchResponses(items=[], total=0)

            matrix = np.stack([doc["vectors"][key] for doc in candidates])
            norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(target)
            with np.errstate(divide="ignore", invalid="ignore"):
                cosine = np.where(norms > 0, matrix @ target / np.where(norms > 0, norms, 1.0), 0.0)
            scores = (1.0 + cosine) / 2.0
            ranking = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i]["_seq"]))
            top = ranking[: max(int(max_results), 0)]
            items = [
                SearchResponseItem(record_id=UUID(candidates[i]["id"]), score=float(scores[i]))
                for i in top
                if threshold is None or scores[i] >= threshold
            ]
            return SearchResponses(items=items, total=len(top))


def reset_store() -> None:
    """Forget every index (used by the start-up re-index and tests)."""
    STORE.clear()

