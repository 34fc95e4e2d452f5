package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/bench/simfs"
)

// filesConfig is one way of reading the files.
type filesConfig struct {
	Label string
	Model *simfs.Params // nil: the local disk directly
	MaxN  int           // skip larger N (0: no limit)
}

// Files reads the same total size split into N files, for growing N, from
// the local disk and through the filesystem model, and reports throughput.
func Files(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	total := int64(200_000_000)
	ns := []int{1, 10, 100, 1000, 10_000, 100_000}
	if o.Quick {
		total = 20_000_000
		ns = []int{1, 10, 100, 1000}
	}
	local, idle, busy := simfs.Presets["local"], simfs.Presets["lustre-idle"], simfs.Presets["lustre-busy"]
	configs := []filesConfig{
		{Label: "local disk", Model: nil},
		{Label: "simfs local (FUSE only)", Model: &local},
		{Label: "simfs lustre-idle", Model: &idle},
		{Label: "simfs lustre-busy", Model: &busy, MaxN: 10_000},
	}
	if o.Quick {
		configs[3].MaxN = 100
	}
	rep := &Report{
		Name:    "files",
		Title:   fmt.Sprintf("Reading %d MB split into N files", total/1_000_000),
		Env:     DetectEnv(o.Accel, o.Quick),
		Models:  []simfs.Params{local, idle, busy},
		Columns: []string{"config", "files", "file_size_bytes", "seconds", "mb_per_s", "files_per_s", "meta_ops", "meta_ops_per_file", "read_requests"},
	}
	rep.Notes = append(rep.Notes,
		"One reader thread opens, reads (1 MiB buffer) and closes every file in order. Before each pass every file's page cache is dropped with posix_fadvise(DONTNEED), so the local-disk row reads the disk and the simulated rows re-read through the model (FUSE without kept page cache).",
		fmt.Sprintf("lustre-busy is measured up to N = %d only: beyond that one pass takes too long for the run.", configs[3].MaxN))
	sim, err := mountSim(&o, local)
	if err != nil {
		return nil, err
	}
	defer unmountSim(sim, o.Log)
	for _, n := range ns {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rel := filepath.Join("files", fmt.Sprintf("%d-%d", total, n))
		dir := filepath.Join(sim.Backing, rel)
		size := total / int64(n)
		t0 := time.Now()
		o.progress("[files] N=%d: preparing %d files of %d bytes", n, n, size)
		names, err := makeFiles(dir, n, size)
		if err != nil {
			return nil, err
		}
		if d := time.Since(t0); d > time.Second {
			o.progress("[files] created %d files of %d bytes in %.1fs", n, size, d.Seconds())
		}
		for _, c := range configs {
			if c.MaxN > 0 && n > c.MaxN {
				continue
			}
			root := dir
			if c.Model != nil {
				sim.SetParams(*c.Model)
				root = filepath.Join(sim.Mountpoint, rel)
			}
			dropCache(dir, names)
			before := sim.Counts()
			t0 := time.Now()
			label := fmt.Sprintf("[files] N=%-6d %-24s", n, c.Label)
			read, err := readAll(ctx, root, names, func(done int) {
				o.progress("%s … %d/%d files, %.0fs", label, done, n, time.Since(t0).Seconds())
			})
			if err != nil {
				return nil, fmt.Errorf("reading %d files via %s: %w", n, c.Label, err)
			}
			el := time.Since(t0).Seconds()
			if read != size*int64(n) {
				return nil, fmt.Errorf("read %d bytes via %s, want %d", read, c.Label, size*int64(n))
			}
			mbps := float64(read) / 1e6 / el
			row := []string{c.Label, strconv.Itoa(n), strconv.FormatInt(size, 10), f3(el), f1(mbps), f1(float64(n) / el), "", "", ""}
			if c.Model != nil {
				d := sim.Counts().Sub(before)
				row[6] = strconv.FormatInt(d.Meta(), 10)
				row[7] = f1(float64(d.Meta()) / float64(n))
				row[8] = strconv.FormatInt(d.Ops[simfs.OpRead], 10)
			}
			rep.Rows = append(rep.Rows, row)
			o.progress("%s %7.2fs %8.1f MB/s", label, el, mbps)
		}
	}
	if err := rep.write(o.Out); err != nil {
		return nil, err
	}
	pngs, err := plotFiles(rep, o.Out)
	if err != nil {
		return nil, err
	}
	rep.Files = append(rep.Files, pngs...)
	return rep, nil
}

// makeFiles creates n files of size bytes in dir unless a complete set is
// there already, and returns their names in read order.
func makeFiles(dir string, n int, size int64) ([]string, error) {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("f%06d", i)
	}
	done := filepath.Join(dir, ".complete")
	if _, err := os.Stat(done); err == nil {
		return names, nil
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	buf := make([]byte, min(size, 4<<20))
	rand.Read(buf)
	for _, name := range names {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("creating bench files (need %d MB free in %s): %w", size*int64(n)/1_000_000, dir, err)
		}
		for left := size; left > 0; {
			k := min(left, int64(len(buf)))
			if _, err := f.Write(buf[:k]); err != nil {
				f.Close()
				return nil, fmt.Errorf("writing bench files: %w", err)
			}
			left -= k
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	}
	unix.Sync()
	if err := os.WriteFile(done, nil, 0o644); err != nil {
		return nil, err
	}
	return names, nil
}

// dropCache evicts the files' pages so the next read goes to the disk.
func dropCache(dir string, names []string) {
	for _, n := range names {
		fd, err := unix.Open(filepath.Join(dir, n), unix.O_RDONLY, 0)
		if err != nil {
			continue
		}
		unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
		unix.Close(fd)
	}
}

// readAll reads every file once and calls progress about every 15 s.
func readAll(ctx context.Context, dir string, names []string, progress func(done int)) (int64, error) {
	buf := make([]byte, 1<<20)
	var total int64
	last := time.Now()
	for i, n := range names {
		if i%100 == 0 {
			if ctx.Err() != nil {
				return total, ctx.Err()
			}
			if time.Since(last) > 15*time.Second {
				progress(i)
				last = time.Now()
			}
		}
		f, err := os.Open(filepath.Join(dir, n))
		if err != nil {
			return total, err
		}
		k, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
		f.Close()
		total += k
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

func f1(x float64) string { return strconv.FormatFloat(x, 'f', 1, 64) }
func f3(x float64) string { return strconv.FormatFloat(x, 'f', 3, 64) }
