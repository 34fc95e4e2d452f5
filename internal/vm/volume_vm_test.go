package vm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
	"github.com/kiln-dev/kiln/internal/vm"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// volumeProbe runs in the guest and reports, as JSON, what it could read
// and write through the volumes /data (read-only) and /out (rw).
const volumeProbe = `
import ctypes, json, os
r = {"csv": open("/data/x.csv").read()}
def read(p):
    try:
        return open(p).read()
    except OSError as e:
        return "error: " + os.strerror(e.errno)
for name in ["abs", "rel", "dirlink/secret", "../outside/secret"]:
    r[name] = read("/data/" + name)
r["dotdot"] = sorted(os.listdir("/data/..")) == sorted(os.listdir("/"))
r["readlink"] = os.readlink("/data/abs")
try:
    open("/data/new", "w")
    r["ro_write"] = "written"
except OSError as e:
    r["ro_write"] = os.strerror(e.errno)
# The guest is root: it can remount its side writable. The host's side
# (QEMU's readonly=on) still refuses the write.
libc = ctypes.CDLL(None, use_errno=True)
r["remount"] = libc.mount(b"kiln0", b"/data", b"9p", 32, b"trans=virtio,version=9p2000.L")  # MS_REMOUNT
try:
    with open("/data/new", "w") as f:
        f.write("x")
    r["remount_write"] = "written"
except OSError as e:
    r["remount_write"] = os.strerror(e.errno)
os.makedirs("/out/sub")
with open("/out/sub/w.txt", "w") as f:
    f.write("from the guest")
os.symlink("/etc/hostname", "/out/link")
print(json.dumps(r))
`

// volumeDirs makes the host side of the probe: in/ with a CSV and
// symlinks that point out of the volume (absolute, relative and through a
// directory), outside/ with a secret, and an empty out/.
func volumeDirs(t *testing.T) (in, out, secret string) {
	t.Helper()
	d := t.TempDir()
	in, out = filepath.Join(d, "in"), filepath.Join(d, "out")
	outside := filepath.Join(d, "outside")
	for _, p := range []string{in, out, outside} {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	secret = "host-secret-" + filepath.Base(d)
	for p, s := range map[string]string{filepath.Join(in, "x.csv"): "a,b\n1,2\n", filepath.Join(outside, "secret"): secret} {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, target := range map[string]string{"abs": filepath.Join(outside, "secret"), "rel": "../outside/secret", "dirlink": outside} {
		if err := os.Symlink(target, filepath.Join(in, name)); err != nil {
			t.Fatal(err)
		}
	}
	return in, out, secret
}

// checkVolumeProbe checks the probe's report and the host side after it.
func checkVolumeProbe(t *testing.T, stdout, in, out, secret string) {
	t.Helper()
	if strings.Contains(stdout, secret) {
		t.Errorf("the guest read %s, a file outside the volume, through a symlink or ..: %s", secret, stdout)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("probe output %q: %v", stdout, err)
	}
	noEnt := "error: No such file or directory"
	want := map[string]any{
		"csv": "a,b\n1,2\n",
		// Symlinks are resolved by the guest, in the guest: none reaches the host's files.
		"abs": noEnt, "rel": noEnt, "dirlink/secret": noEnt, "../outside/secret": noEnt,
		"dotdot":   true, // .. at the volume's root is the guest's /
		"readlink": filepath.Join(filepath.Dir(in), "outside", "secret"),
		"ro_write": "Read-only file system", "remount": 0.0, "remount_write": "Read-only file system",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("guest probe mismatch (-want +got):\n%s", diff)
	}
	if _, err := os.Lstat(filepath.Join(in, "new")); !os.IsNotExist(err) {
		t.Errorf("the guest created a file in the read-only volume (lstat: %v)", err)
	}
	p := filepath.Join(out, "sub", "w.txt")
	b, err := os.ReadFile(p)
	if err != nil || string(b) != "from the guest" {
		t.Fatalf("ReadFile(%s) = %q, %v; want the guest's write", p, b, err)
	}
	for _, q := range []string{p, filepath.Dir(p)} {
		fi, err := os.Lstat(q)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if int(st.Uid) != os.Getuid() || int(st.Gid) != os.Getgid() {
			t.Errorf("%s is owned by %d:%d, want the calling user %d:%d", q, st.Uid, st.Gid, os.Getuid(), os.Getgid())
		}
	}
	if target, err := os.Readlink(filepath.Join(out, "link")); err != nil || target != "/etc/hostname" {
		t.Errorf("the guest's symlink on the host = %q, %v; want a plain symlink to /etc/hostname", target, err)
	}
}

// TestVolumesCold boots a command with a read-only and a writable volume:
// it reads the host's file, writes one that lands on the host owned by
// the calling user, and cannot reach outside the volumes through
// symlinks or .., nor write to the read-only one even after remounting
// it.
func TestVolumesCold(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	in, out, secret := volumeDirs(t)
	var vols []vm.Volume
	for _, s := range []string{in + ":/data", out + ":/out:rw"} {
		v, err := vm.ParseVolume(s)
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	v, err := vm.New(vm.Config{Image: img, Volumes: vols}, vm.WithCommand([]string{"python3", "-c", volumeProbe}, nil, vm.Stdio{Stdout: &stdout, Stderr: &stderr}))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.Start(ctx); err != nil {
		t.Fatalf("Start() = %v", err)
	}
	exit, err := v.Wait(ctx)
	if err != nil || exit.Code != 0 {
		t.Fatalf("Wait() = %+v, %v; stderr:\n%s", exit, err, stderr.String())
	}
	checkVolumeProbe(t, stdout.String(), in, out, secret)
}

// TestVolumeErrors: a guest path inside the read-only image fails with a
// message that says where a volume can go.
func TestVolumeErrors(t *testing.T) {
	img := testutil.OpenImage(t, testimage.Numpy(t))
	v, err := vm.New(vm.Config{Image: img, Volumes: []vm.Volume{{Host: t.TempDir(), Guest: "/data"}, {Host: t.TempDir(), Guest: "/home/x"}}},
		vm.WithCommand([]string{"true"}, nil, vm.Stdio{}))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := v.Start(ctx); err != nil {
		t.Fatalf("Start() = %v", err)
	}
	exit, err := v.Wait(ctx)
	if want := "mounting volume /home/x: creating mountpoint /home/x: the image is read-only there: mount the volume on a new top-level directory (such as /data) or under /tmp"; err != nil || exit.Code != 1 || !strings.Contains(exit.Error, want) {
		t.Errorf("Wait() with a volume at /home/x (in the image) = %+v, %v; want exit 1 with an error containing %q", exit, err, want)
	}
}

// throughputProbe reads a workload and prints the seconds it took,
// measured by itself (so a VM's boot is not counted): "big PATH" reads the
// file in 1 MiB chunks, "small PATH" every file in the directories under
// PATH, "import PATH" imports every module (but __main__) of the
// pure-Python package pygments found in PATH.
const throughputProbe = `
import os, sys, time
what, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
n = 0
if what == "big":
    with open(path, "rb", buffering=0) as f:
        while b := f.read(1 << 20):
            n += len(b)
elif what == "small":
    for d in sorted(os.listdir(path)):
        for name in os.listdir(path + "/" + d):
            with open(path + "/" + d + "/" + name, "rb") as f:
                n += len(f.read())
else:
    import importlib, pkgutil
    sys.path.insert(0, path)
    import pygments
    assert pygments.__file__.startswith(path), pygments.__file__
    for m in pkgutil.walk_packages(pygments.__path__, "pygments."):
        if m.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(m.name)
            n += 1
        except ImportError:  # an optional dependency (docutils)
            pass
print(time.perf_counter() - t, n)
`

// pygmentsSpec is an image with Debian's pygments baked in, for the
// import row "image".
const pygmentsSpec = `name = "pygments-test"
python = "/usr/bin/python3"
debian = ["python3-pygments"]
memory = "512M"
vcpus = 1
`

// hostPygments is Debian's pygments on the host (python3-pygments), the
// same package pygmentsSpec bakes in.
const hostPygments = "/usr/lib/python3/dist-packages/pygments"

// volumeData writes the throughput workloads into a new directory: a
// 200 MB file, 10,000 files of 1 KiB in 100 directories, and the host's
// pygments under pkg/, byte-compiled by python (the guest's Python).
func volumeData(b *testing.B, python string) string {
	b.Helper()
	d := b.TempDir()
	big := make([]byte, 200<<20/10)
	if _, err := rand.Read(big); err != nil {
		b.Fatal(err)
	}
	f, err := os.Create(filepath.Join(d, "big.bin"))
	if err != nil {
		b.Fatal(err)
	}
	for range 10 {
		if _, err := f.Write(big); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	for i := range 100 {
		sub := filepath.Join(d, "small", fmt.Sprintf("d%03d", i))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			b.Fatal(err)
		}
		for j := range 100 {
			if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%03d", j)), big[:1024], 0o644); err != nil {
				b.Fatal(err)
			}
		}
	}
	if _, err := os.Stat(hostPygments); err != nil {
		b.Skipf("needs the pure-Python package %s (apt-get install python3-pygments): %v", hostPygments, err)
	}
	if err := os.Mkdir(filepath.Join(d, "pkg"), 0o755); err != nil {
		b.Fatal(err)
	}
	for _, c := range [][]string{
		{"cp", "-r", hostPygments, filepath.Join(d, "pkg", "pygments")},
		{"find", filepath.Join(d, "pkg"), "-name", "__pycache__", "-prune", "-exec", "rm", "-r", "{}", "+"},
		{python, "-m", "compileall", "-q", filepath.Join(d, "pkg")},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	return d
}

// guestOutput runs argv in a cold VM of img with vols and returns its
// stdout.
func guestOutput(b *testing.B, img *image.Image, vols []vm.Volume, argv ...string) string {
	b.Helper()
	var stdout, stderr bytes.Buffer
	v, err := vm.New(vm.Config{Image: img, Volumes: vols}, vm.WithCommand(argv, nil, vm.Stdio{Stdout: &stdout, Stderr: &stderr}))
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := v.Start(ctx); err != nil {
		b.Fatal(err)
	}
	exit, err := v.Wait(ctx)
	if err != nil || exit.Code != 0 {
		b.Fatalf("guest %v: %+v, %v\n%s", argv, exit, err, stderr.String())
	}
	return stdout.String()
}

// BenchmarkVolumeRead reads the same workloads on the host ("host"), in a
// VM of kiln's kernel through a read-only volume of the same directory
// ("volume") and, for the import, from the image ("image": Debian's
// pygments baked in). The metric s/read is the time the reading process
// measured itself (a VM's boot excluded). Host and volume read from the
// host's page cache, warmed by the first host run. Python runs without
// site-packages (-S), so the imports find only the package under test.
//
//	go test -run '^$' -bench BenchmarkVolumeRead -benchtime 3x ./internal/vm/
func BenchmarkVolumeRead(b *testing.B) {
	img := testutil.OpenImage(b, testimage.Numpy(b))
	const python = "/usr/bin/python3" // the interpreter the test images copy
	data := volumeData(b, python)
	baked := testutil.OpenImage(b, testimage.Image(b, pygmentsSpec))
	vol, err := vm.ParseVolume(data + ":/data")
	if err != nil {
		b.Fatal(err)
	}
	paths := map[string][2]string{ // host path, guest path
		"big": {data + "/big.bin", "/data/big.bin"}, "small": {data + "/small", "/data/small"}, "import": {data + "/pkg", "/data/pkg"},
	}
	parse := func(b *testing.B, what, out string) float64 {
		var s float64
		var n int
		if _, err := fmt.Sscan(out, &s, &n); err != nil || n == 0 {
			b.Fatalf("probe output %q: %v", out, err)
		}
		if want := map[string]int{"big": 200 << 20, "small": 10000 << 10}[what]; want != 0 && n != want {
			b.Fatalf("probe read %d bytes, want %d", n, want)
		}
		return s
	}
	for _, what := range []string{"big", "small", "import"} {
		wheres := []string{"host", "volume"}
		if what == "import" {
			wheres = append(wheres, "image")
		}
		for _, where := range wheres {
			b.Run(where+"/"+what, func(b *testing.B) {
				var total float64
				for b.Loop() {
					var out string
					switch where {
					case "host":
						o, err := exec.Command(python, "-S", "-c", throughputProbe, what, paths[what][0]).Output()
						if err != nil {
							b.Fatal(err)
						}
						out = string(o)
					case "volume":
						out = guestOutput(b, img, []vm.Volume{vol}, "python3", "-S", "-c", throughputProbe, what, paths[what][1])
					case "image":
						out = guestOutput(b, baked, nil, "python3", "-S", "-c", throughputProbe, what, filepath.Dir(hostPygments))
					}
					total += parse(b, what, out)
				}
				s := total / float64(b.N)
				b.ReportMetric(s, "s/read")
				if what == "big" {
					b.ReportMetric(200/s, "MB/s")
				}
			})
		}
	}
}
