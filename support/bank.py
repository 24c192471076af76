"""The teacher bank's storage: the teacher's logits (float16) for views 0, 1, ... of every
training image, asked once and kept in one .npz file (common.teacher_for decides what the
teacher is asked; this file only stores, resumes and serves the rows)."""
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from support import files
from support.running import Interrupted, warn


class TeacherBank:
    """One .npz file under ckpt_dir, named by a key of everything the logits depend on (the
    caller's `key`, a dict), which is checked inside the file too: any change makes a new bank,
    a stale one is never served. Views are built when first needed, each saved when done (a
    view cut short by Ctrl-C keeps its finished rows), so a build resumes by itself."""
    batch_size = None  # images per teacher forward; None: 1024 on a GPU (halved until it fits), 128 on a CPU

    def __init__(self, ckpt_dir, key, n, num_classes):
        self.key = json.dumps(key, sort_keys=True)
        self.path = Path(ckpt_dir) / f"teacher_bank_{hashlib.sha1(self.key.encode()).hexdigest()[:16]}.npz"
        self.n, self.num_classes, self.images = n, num_classes, 0
        self.views, self.on_device = self.read(), {}

    def read(self):
        """{view: float16 rows (all n, or the first ones of a build cut short)} from the file."""
        if not self.path.exists():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["key"]) != self.key:
                    raise ValueError("another key")
                views = {int(k.removeprefix("view_")): z[k] for k in z.files if k.startswith("view_")}
            if all(v.dtype == np.float16 and v.ndim == 2 and v.shape[1] == self.num_classes
                   and len(v) <= self.n for v in views.values()):
                return views
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass
        warn(f"{self.path}: damaged; building the teacher bank again")
        return {}

    def save(self):
        arrays = {f"view_{v}": rows for v, rows in sorted(self.views.items())}
        files.atomic_write(self.path, lambda f: np.savez(f, key=np.array(self.key), **arrays))

    def missing(self, views):
        return [v for v in views if len(self.views.get(v, ())) < self.n]

    def build(self, views, asker, on_gpu):
        """Make sure the bank holds these views. asker() -> ask_view(v) -> ask(idx): the
        teacher's float16 CPU logits for view v of images idx; called only when a view is missing
        (so the teacher is loaded only then), at the largest batch that fits."""
        missing = self.missing(views)
        if not missing:
            print(f"teacher bank {self.path.name}: serves views 0-{max(views)}; the teacher is not loaded")
            return self
        print(f"teacher bank {self.path.name}: asking the teacher about views {', '.join(map(str, missing))} "
              f"of {self.n} training images ({sum(v in self.views for v in missing)} resumed)")
        ask_view = asker()
        bar = tqdm(total=sum(self.n - len(self.views.get(v, ())) for v in missing), desc="teacher bank",
                   leave=False, disable=None, unit="img")
        batch_size = self.batch_size or (1024 if on_gpu else 128)
        for v in missing:
            ask = ask_view(v)
            rows = [torch.from_numpy(self.views.get(v, np.zeros((0, self.num_classes), np.float16)))]
            done = len(rows[0])
            try:
                while done < self.n:
                    try:
                        rows.append(ask(torch.arange(done, min(self.n, done + batch_size))))
                    except torch.cuda.OutOfMemoryError:
                        if batch_size == 1:
                            raise
                        batch_size //= 2
                        torch.cuda.empty_cache()
                        continue
                    done += len(rows[-1])
                    self.images += len(rows[-1])
                    bar.update(len(rows[-1]))
            except KeyboardInterrupt:
                bar.close()
                self.views[v] = torch.cat(rows).numpy()
                self.save()
                raise Interrupted(f"the teacher bank was being built; {self.path} keeps what was done "
                                  "(rerun to go on from there); the previous outputs are as they were") from None
            self.views[v] = torch.cat(rows).numpy()
            self.save()
        bar.close()
        return self

    def __call__(self, batch):
        """The teacher's logits for the batch: rows batch.idx of view batch.view."""
        if batch.view not in self.on_device:
            rows = self.views.get(batch.view)
            if rows is None or len(rows) < self.n:
                raise RuntimeError(f"view {batch.view} is not in the teacher bank")  # fit asks only for built views
            self.on_device[batch.view] = torch.from_numpy(rows).to(batch.y.device)
        return self.on_device[batch.view][batch.idx.to(batch.y.device)]
