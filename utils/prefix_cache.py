"""What the serving engine keeps of finished requests: their KV rows, found again by content, and the image
embeddings of recent images.

    key = PromptKey.of(inputs)                       # a processor output: token ids, positions, image hash
    length, chunks = cache.match(key, key.positions - 1)
    ...                                              # the engine copies `chunks` into a KV row, prefills the rest
    cache.insert(key, lambda start, end: slot_cache.read(row, start, end))

Matching is stateless, by content, as vLLM's automatic prefix caching and SGLang's RadixAttention do: any
request whose prompt starts with what an earlier one computed (the same image, the same history) reuses it,
whichever front end sent it. The keys form a radix tree (SGLang's choice rather than vLLM's hashed blocks of
16 tokens): our KV rows are contiguous per request, not paged, so blocks buy nothing, and a tree matches to
the token, where blocks would recompute up to a block of every prompt. A node holds the keys and values of
its edge's positions as one tensor (models.kv_cache.SlotKVCache.read), so a shared prefix (one image asked
about twice, a conversation's earlier turns) is stored once.

A position's keys and values depend on everything up to it: the token ids, their positions and, for the image
block, the pixels (its input ids are placeholders). So a text token's key is (token id, position), and the
whole image block (boi, patches, eoi) is one key element, the hash of its pixels and of its positions and
masks: a match never ends inside an image block, whose embeddings a partial prefill could not take.
Eviction: least recently used leaves first, until the stored tensors fit the budget.
"""
import collections
import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def image_digest(pixels: torch.Tensor) -> bytes:
    """A content hash of one image's pixels (3, S, S), as the image processor gives them."""
    data = pixels.detach().to("cpu").contiguous()
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16,
                           person=str(data.dtype).encode()[:16]).digest()


@dataclass(frozen=True)
class ImageElement:
    """The image block of a prompt as one key element: `width` positions (boi, patches, eoi)."""
    digest: bytes  # the pixels' image_digest
    block: bytes  # a hash of the block's positions and masks
    width: int


@dataclass
class PromptKey:
    """The content of a sequence, one element per text token ((token id, position)) and one per image block
    (ImageElement). `widths[i]`: the positions element i covers; `image_digest`: the block's pixel hash, if any."""
    elements: List[object]
    widths: List[int]
    image_digest: Optional[bytes] = None

    @property
    def positions(self) -> int:
        return sum(self.widths)

    @classmethod
    def of(cls, inputs: Dict[str, torch.Tensor]) -> "PromptKey":
        """The key of a processor output ((1, L) input_ids, position_ids, masks; `images` (1, 3, S, S) when it has
        an image block)."""
        ids, positions = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
        in_block = inputs["image_embed_mask"][0].bool()
        elements, widths, digest = [], [], None
        index = 0
        while index < len(ids):
            if not in_block[index]:
                elements.append((ids[index], positions[index]))
                widths.append(1)
                index += 1
                continue
            end = index
            while end < len(ids) and in_block[end]:
                end += 1
            if digest is not None:
                raise ValueError("a prompt with more than one image block")
            digest = image_digest(inputs["images"][0])
            layout = torch.stack([inputs["position_ids"][0, index:end].long(),
                                  inputs["vision_expert_mask"][0, index:end].long()])
            block = hashlib.blake2b(layout.numpy().tobytes() + index.to_bytes(8, "little"), digest_size=16).digest()
            elements.append(ImageElement(digest, block, end - index))
            widths.append(end - index)
            index = end
        return cls(elements, widths, digest)

    def extended(self, token_ids: Sequence[int], first_position: int) -> "PromptKey":
        """This key followed by generated tokens at positions first_position, first_position + 1, ..."""
        tokens = [(token, first_position + i) for i, token in enumerate(token_ids)]
        return PromptKey(self.elements + tokens, self.widths + [1] * len(tokens), self.image_digest)

    def cut(self, max_positions: int) -> int:
        """How many leading elements fit in `max_positions` positions."""
        total = 0
        for count, width in enumerate(self.widths):
            total += width
            if total > max_positions:
                return count
        return len(self.widths)


class _Node:
    __slots__ = ("elements", "widths", "kv", "children", "parent", "last_used")

    def __init__(self, elements, widths, kv, parent):
        self.elements, self.widths, self.kv, self.parent = elements, widths, kv, parent
        self.children: Dict[object, "_Node"] = {}
        self.last_used = 0

    @property
    def positions(self) -> int:
        return self.kv.shape[3] if self.kv is not None else 0

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() if self.kv is not None else 0


def _common_prefix(a: Sequence, b: Sequence) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


class PrefixCache:
    """A radix tree of computed sequences and their keys/values, within `capacity_bytes` (see the module doc).

    The KV tensors are whatever `insert`'s reader returns, (..., positions, head_dim) with positions on dim 3
    (models.kv_cache.SlotKVCache.read), `position_bytes` per position; `match` hands back views of them, to be
    copied before the next insert.
    """

    def __init__(self, capacity_bytes: int, position_bytes: int):
        self.capacity_bytes, self.position_bytes = int(capacity_bytes), int(position_bytes)
        self.root = _Node([], [], None, None)
        self.nbytes = 0
        self._clock = itertools.count(1)
        self.hits = self.queries = 0
        self.hit_positions = self.query_positions = 0  # what matched / what was asked, over all queries

    def match(self, key: PromptKey, max_positions: int) -> Tuple[int, List[torch.Tensor]]:
        """The longest cached prefix of `key` of at most `max_positions` positions: (its positions, the KV
        chunks that hold them in order). Marks the path as used."""
        elements = key.elements[:key.cut(max_positions)]
        node, done, matched, chunks = self.root, 0, 0, []
        now = next(self._clock)
        while done < len(elements):
            child = node.children.get(elements[done])
            if child is None:
                break
            common = _common_prefix(child.elements, elements[done:])
            width = sum(child.widths[:common])
            chunks.append(child.kv if common == len(child.elements) else child.kv[:, :, :, :width])
            matched += width
            done += common
            child.last_used = now
            if common < len(child.elements):
                break
            node = child
        self.queries += 1
        self.hits += matched > 0
        self.hit_positions += matched
        self.query_positions += key.positions
        return matched, chunks

    def insert(self, key: PromptKey, read: Callable[[int, int], torch.Tensor], positions: Optional[int] = None
               ) -> None:
        """Store the sequence `key` (its first `positions` positions, at most what the budget holds, cut at an
        element boundary): what the tree lacks is read with `read(start, end)` -> KV of positions [start, end).
        Then evicts down to the budget (least recently used leaves first)."""
        if self.capacity_bytes <= 0:
            return
        fits = self.capacity_bytes // max(1, self.position_bytes)  # a sequence longer than that keeps its start
        count = key.cut(min(key.positions if positions is None else positions, fits))
        elements, widths = key.elements[:count], key.widths[:count]
        node, done, start = self.root, 0, 0
        now = next(self._clock)
        while done < len(elements):
            child = node.children.get(elements[done])
            if child is None:
                break
            common = _common_prefix(child.elements, elements[done:])
            if common < len(child.elements):
                child = self._split(child, common)
            child.last_used = now
            start += sum(child.widths)
            done += common
            node = child
        end = start + sum(widths[done:])
        if done < len(elements) and (end - start) * self.position_bytes <= self.capacity_bytes:
            leaf = _Node(elements[done:], widths[done:], read(start, end), node)
            leaf.last_used = now
            node.children[leaf.elements[0]] = leaf
            self.nbytes += leaf.nbytes()
        self._evict()

    def _split(self, node: _Node, count: int) -> _Node:
        """Cut `node`'s edge after `count` elements; returns the new upper node (the old one is its child).
        Both halves are copied out, so that either can be evicted alone and free its memory."""
        width = sum(node.widths[:count])
        upper = _Node(node.elements[:count], node.widths[:count], node.kv[:, :, :, :width].clone(), node.parent)
        upper.last_used = node.last_used
        node.parent.children[upper.elements[0]] = upper
        node.elements, node.widths = node.elements[count:], node.widths[count:]
        node.kv = node.kv[:, :, :, width:].clone()
        node.parent = upper
        upper.children[node.elements[0]] = node
        return upper

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes:
            leaves = [n for n in self._nodes() if not n.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.last_used)
            del victim.parent.children[victim.elements[0]]
            self.nbytes -= victim.nbytes()

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def positions(self) -> int:
        """Positions stored (a shared prefix counts once)."""
        return sum(node.positions for node in self._nodes())

    def clear(self) -> None:
        self.root.children.clear()
        self.nbytes = 0


class ImageEmbeddingCache:
    """The ViT + adapter output of recent images by pixel hash, least recently used dropped beyond
    `capacity_bytes`. Values: (image_length, hidden) tensors."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self._entries: "collections.OrderedDict[bytes, torch.Tensor]" = collections.OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> Optional[torch.Tensor]:
        embeddings = self._entries.get(digest)
        if embeddings is not None:
            self._entries.move_to_end(digest)
        return embeddings

    def put(self, digest: bytes, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if size > self.capacity_bytes or digest in self._entries:
            return
        self._entries[digest] = embeddings
        self.nbytes += size
        while self.nbytes > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()
