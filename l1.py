import torch, copy, pickle, io, featcloud.torch as ft
def T(name, f):
    try: print(name, "->", f())
    except Exception as e: print(name, "EXC", type(e).__name__, str(e)[:200])
torch.manual_seed(0)
C, D = 6, 5
def batch(seed, b=96):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (b,), generator=g); return torch.randn(b, D, generator=g), y
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10)
T("double()", lambda: (h.double()(*batch(0)).dtype, {k: v.dtype for k, v in h.state_dict().items()}))
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10)
T("deepcopy", lambda: copy.deepcopy(h)(*batch(1)))
T("pickle", lambda: pickle.loads(pickle.dumps(h))(*batch(1)))
buf = io.BytesIO(); torch.save(h.state_dict(), buf); buf.seek(0)
T("torch.load weights_only", lambda: ft.LeapHead(C, D, warmup_steps=0, threshold=10).load_state_dict(torch.load(buf, weights_only=True)))
# no_grad in training mode updates stats
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10)
with torch.no_grad(): h(*batch(2))
T("no_grad train-mode step advanced", lambda: int(h.step))
# checkpoint
from torch.utils.checkpoint import checkpoint
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10)
x, y = batch(3); x.requires_grad_()
def ck():
    l = checkpoint(lambda a: h(a, y), x, use_reentrant=False); l.backward(); return int(h.step), int(h.stats_n.sum())
T("checkpoint steps/n", ck)
T("class_counts tensor", lambda: ft.LeapHead(C, D, class_counts=torch.tensor([100]*3+[1]*3)).stats_json)
T("class_counts wrong len", lambda: ft.LeapHead(C, D, class_counts=[1]*5))
T("class_counts floats", lambda: ft.LeapHead(C, D, class_counts=[1.7]*6).stats_json)
T("class_counts all zero adaptive", lambda: ft.LeapHead(C, D, split="adaptive", warmup_steps=0, class_counts=[0]*6)(*batch(4)))
T("threshold negative", lambda: ft.LeapHead(C, D, threshold=-1))
T("warmup negative", lambda: ft.LeapHead(C, D, warmup_steps=-5))
T("seed via stats", lambda: ft.LeapHead(C, D, seed=2**64))
T("jit.script", lambda: torch.jit.script(ft.MarginHead(C, D)))
T("reduction none leap", lambda: ft.LeapHead(C, D, reduction="none", warmup_steps=0)(*batch(5)).shape)
T("leap ignored only", lambda: ft.LeapHead(C, D, warmup_steps=0)(batch(5)[0], torch.full((96,), -1)))
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10); h.stats_updates.fill_(-1)
T("stats_updates -1", lambda: h(*batch(6)))
h = ft.LeapHead(C, D, warmup_steps=0, threshold=10); h.step.fill_(-1)
T("step -1", lambda: h(*batch(6)))
h = ft.LeapHead(C, D); h.register_buffer("stats_mu", torch.zeros(2*C, dtype=torch.float64)[::2])
T("noncontig buffer", lambda: h(*batch(6)))
h = ft.LeapHead(C, D); h.stats_mu = torch.zeros(C, dtype=torch.float64, device="meta")
T("meta buffer", lambda: h(*batch(6)))
h = ft.LeapHead(C, D); h.stats_v = h.stats_mu
T("aliasing buffers mu=v", lambda: (h(*batch(6)), h.stats_mu[:3]))
h = ft.LeapHead(C, D, subcenters=2); h.stats_centers = h.stats_centers.t()
T("transposed centers", lambda: h(*batch(6)))
