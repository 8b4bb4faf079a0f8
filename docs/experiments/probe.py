"""Issue 5 experiments, in memory (no video files): render a synthetic variant (variants.py), pre-train the
tiny VideoMAE of pretrain.py's synthetic row on tube-masked clips (8 frames at stride 4, 64x64, 8x8 patches),
then linear-probe three frozen encoders: random (official init), the pre-trained one, and the norm-matched
control (random, each matrix rescaled to the pre-trained one's Frobenius norm, LayerNorms 1/0, biases 0).

The probe: mean-pooled tokens of the blocks (as linprobe.py: no final norm), standardised, then a linear layer
trained to convergence (full batch Adam, 300 steps) on 3 clips per training video; test = 1 centre clip of
each of the 96 test videos. Printed per weight decay: (test top-1, train top-1).

usage (from the repository root):  python docs/experiments/probe.py VARIANT STEPS [key=value ...]
  python docs/experiments/probe.py v5 1200                 # the shipped set v5
  python docs/experiments/probe.py field 1500 "v_cyc=(0.5,1.5)"   # v_* go to the renderer, the rest to pretrain()
  python docs/experiments/probe.py field 4000 "v_cyc=(0.5,1.5)" probe_every=1000   # probe during the run too
  python docs/experiments/probe.py field 4000 "v_cyc=(0.5,1.5)" ratio=0.75        # as pretrain.py's synthetic row now
The in-memory pre-training draws whole frames (no crop), like pretrain.py's synthetic row (--crop center).
Datasets are cached in /tmp/ds-*.pt."""
import sys, time, math, numpy as np, torch, torch.nn.functional as F
import os; HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE))); sys.path.insert(0, HERE)
import model as M, masking
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
MEAN = torch.tensor(M.IMAGENET_MEAN).view(3, 1, 1, 1); STD = torch.tensor(M.IMAGENET_STD).view(3, 1, 1, 1)

def make_set(render, ntr=40, nte=12, seed=0, F_=40, S=64):
    X, Y, split = [], [], []
    for c in range(8):
        for k in range(ntr + nte):
            rng = np.random.default_rng([seed, c, k]); X.append(render(rng, c, F_, S)); Y.append(c); split.append(k < nte)
    X = torch.from_numpy(np.stack(X)); Y = torch.tensor(Y); te = torch.tensor(split)
    return X[~te], Y[~te], X[te], Y[te]

def clips(X, starts, stride=4, T=8):   # X (B, F, S, S, 3) uint8, starts (B,) -> (B, 3, T, S, S) normalised
    idx = starts[:, None] + stride * torch.arange(T)[None]
    v = X[torch.arange(len(X))[:, None], idx].permute(0, 4, 1, 2, 3).float() / 255
    return (v - MEAN) / STD

def cfg_model(**kw):
    d = dict(embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=192, decoder_num_heads=3, decoder_depth=1,
             patch_size=8, img_size=64, num_frames=8); d.update(kw); return d

def pretrain(Xtr, steps, lr=1.5e-3, bs=8, ratio=0.9, warm=40, norm=True, mkw={}, seed=0, log=100, mask='tube',
             hook=None, hook_every=0):
    torch.manual_seed(seed)
    net = M.build_pretrain('small', **cfg_model(**mkw))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(seed); p, t = net.patch_size, net.tubelet_size
    losses = []; t0 = time.time()
    for it in range(steps):
        for gr in opt.param_groups:
            gr['lr'] = lr * it / warm if it < warm else 5e-5 + (lr - 5e-5) * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, steps - warm)))
        i = torch.randint(len(Xtr), (bs,), generator=g)
        v = clips(Xtr[i], torch.randint(0, Xtr.shape[1] - 28, (bs,), generator=g))
        m = getattr(masking, mask + '_masking')(bs, net.grid(v.shape), ratio, generator=g)
        loss = M.pretrain_loss(net(v, m), v, m, p, t, norm)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        if (it + 1) % log == 0:
            print(f'  step {it+1} loss {np.mean(losses[-log:]):.4f} ({time.time()-t0:.0f}s)', flush=True)
        if hook and hook_every and (it + 1) % hook_every == 0 and it + 1 < steps:
            hook(net, it + 1); net.train()
    return net

def encoder_feats(enc, X, starts):
    with torch.no_grad():
        out = []
        for i in range(0, len(X), 32):
            v = clips(X[i:i+32], starts[i:i+32])
            # linprobe's features: blocks output without the final norm (VisionTransformer drops encoder.norm)
            x = enc.patch_embed(v) + M._positions(enc, M.grid_of(v.shape, enc.patch_size, enc.tubelet_size), enc.config['embed_dim'], v.device)
            x = M.run_blocks(enc.blocks, x, False)
            out.append(x.mean(1))
        return torch.cat(out)

def probe(enc, Xtr, Ytr, Xte, Yte, epochs=300):
    enc.eval()
    ftr = torch.cat([encoder_feats(enc, Xtr, torch.full((len(Xtr),), s)) for s in (0, 5, 10)]); ytr = Ytr.repeat(3)
    fte = encoder_feats(enc, Xte, torch.full((len(Xte),), 5))
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6; ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    res = {}
    for wd in (1e-3, 1e-2, 1e-1):
        torch.manual_seed(0); lin = torch.nn.Linear(ftr.shape[1], 8); opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=wd)
        for _ in range(epochs):
            l = F.cross_entropy(lin(ftr), ytr); opt.zero_grad(); l.backward(); opt.step()
        with torch.no_grad():
            res[wd] = ((lin(fte).argmax(1) == Yte).float().mean().item() * 100, (lin(ftr).argmax(1) == ytr).float().mean().item() * 100)
    return res

def control_from(net, seed=1):
    """The norm-matched control of make_control.py, for an in-memory model."""
    from make_control import rescaled_random
    cfg = {'model': 'small', 'model_kwargs': {k: net.config[k] for k in cfg_model()}}
    ctl = M.build_pretrain('small', **cfg['model_kwargs']).encoder
    ctl.load_state_dict(rescaled_random(net.encoder.state_dict(), cfg, seed))
    return ctl

if __name__ == '__main__':
    import variants
    name, steps = sys.argv[1], int(sys.argv[2])
    kw = dict(a.split('=') for a in sys.argv[3:])
    kw = {k: eval(v) for k, v in kw.items()}
    vkw = {k[2:]: v for k, v in kw.items() if k.startswith('v_')}; kw = {k: v for k, v in kw.items() if not k.startswith('v_')}
    t0 = time.time()
    cache = f'/tmp/ds-{name}-{sorted(vkw.items())}.pt'
    if os.path.exists(cache): Xtr, Ytr, Xte, Yte = torch.load(cache)
    else:
        Xtr, Ytr, Xte, Yte = make_set(lambda rng, c, F_, S: getattr(variants, name)(rng, c, F_, S, **vkw)); torch.save((Xtr, Ytr, Xte, Yte), cache)
    print(f'{name} {vkw} data {time.time()-t0:.0f}s', flush=True)
    torch.manual_seed(0); rnd = M.build_pretrain('small', **cfg_model(**kw.get('mkw', {}))).encoder
    print('random  ', probe(rnd, Xtr, Ytr, Xte, Yte), flush=True)
    every = kw.pop('probe_every', 0)
    hook = lambda net, it: print(f'probe at step {it}', probe(net.encoder, Xtr, Ytr, Xte, Yte), flush=True)
    net = pretrain(Xtr, steps, hook=hook, hook_every=every, **kw)
    print('pretrain', probe(net.encoder, Xtr, Ytr, Xte, Yte), flush=True)
    print('control ', probe(control_from(net), Xtr, Ytr, Xte, Yte), flush=True)
    torch.save(net.state_dict(), f'/tmp/exp-{name}-{steps}.pt')  # for further probes
