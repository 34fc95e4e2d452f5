package bench

import (
	"encoding/csv"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// column returns the index of name in r.Columns, or -1.
func (r *Report) column(name string) int {
	for i, c := range r.Columns {
		if c == name {
			return i
		}
	}
	return -1
}

// floats reads the named columns of a row; ok is false when one is missing or empty.
func (r *Report) floats(row []string, names ...string) ([]float64, bool) {
	out := make([]float64, len(names))
	for i, n := range names {
		c := r.column(n)
		if c < 0 || c >= len(row) {
			return nil, false
		}
		v, err := strconv.ParseFloat(row[c], 64)
		if err != nil {
			return nil, false
		}
		out[i] = v
	}
	return out, true
}

func plotFiles(rep *Report, dir string) ([]string, error) {
	var pts []linePoint
	for _, row := range rep.Rows {
		if v, ok := rep.floats(row, "files", "mb_per_s"); ok {
			pts = append(pts, linePoint{Series: row[0], X: v[0], Y: v[1]})
		}
	}
	png := filepath.Join(dir, "files.png")
	if err := linePlot(png, rep.Title+" (throughput)", "number of files N (log)", "throughput, MB/s (log)", pts, true); err != nil {
		return nil, err
	}
	return []string{png}, nil
}

func plotImports(rep *Report, dir string) ([]string, error) {
	var timePts, opsPts []linePoint
	for _, row := range rep.Rows {
		v, ok := rep.floats(row, "meta_latency_ms", "wall_s_mean", "meta_ops")
		if !ok {
			continue
		}
		series := row[0] + ", " + shortMode(row[1])
		timePts = append(timePts, linePoint{Series: series, X: v[0], Y: v[1]})
		opsPts = append(opsPts, linePoint{Series: series, X: v[0], Y: v[2]})
	}
	png := filepath.Join(dir, "imports.png")
	if err := linePlot(png, "Import: wall time vs metadata latency of the model", "metadata latency, ms (log)", "wall time, s (log)", timePts, true); err != nil {
		return nil, err
	}
	png2 := filepath.Join(dir, "imports-ops.png")
	if err := linePlot(png2, "Import: metadata operations reaching the shared filesystem", "metadata latency, ms (log)", "metadata operations per run (log)", opsPts, true); err != nil {
		return nil, err
	}
	return []string{png, png2}, nil
}

func plotColdstart(rep *Report, dir string) ([]string, error) {
	var bars []bar
	for _, row := range rep.Rows {
		v, ok := rep.floats(row, "mean_s", "min_s", "max_s")
		if !ok {
			continue
		}
		bars = append(bars, bar{Label: shortRow(strings.TrimSuffix(row[0], " [TCG]")), Mean: v[0], Min: v[1], Max: v[2]})
	}
	if len(bars) == 0 {
		return nil, nil
	}
	png := filepath.Join(dir, "coldstart.png")
	if err := dotPlot(png, "Cold start of one numpy job (mean, min–max)", "seconds (log)", bars, true); err != nil {
		return nil, err
	}
	return []string{png}, nil
}

func plotBoot(rep *Report, dir string) ([]string, error) {
	var bars []bar
	for _, row := range rep.Rows {
		v, ok := rep.floats(row, "import_s_median", "import_s_min", "import_s_max")
		if !ok {
			continue
		}
		bars = append(bars, bar{Label: row[0], Mean: v[0], Min: v[1], Max: v[2]})
	}
	if len(bars) == 0 {
		return nil, nil
	}
	png := filepath.Join(dir, "boot.png")
	if err := rangePlot(png, "import numpy inside a cold-booted VM, by image variant (median, min–max)", "seconds", "median", bars); err != nil {
		return nil, err
	}
	return []string{png}, nil
}

// Replot redraws the PNG files of every experiment whose CSV is in dir and
// returns the files written. Experiments without plots (invoke) are skipped.
func Replot(dir string) ([]string, error) {
	plotters := map[string]func(*Report, string) ([]string, error){
		"files": plotFiles, "imports": plotImports, "coldstart": plotColdstart, "boot": plotBoot,
	}
	var written []string
	for _, name := range Experiments {
		if plotters[name] == nil {
			continue
		}
		f, err := os.Open(filepath.Join(dir, name+".csv"))
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return written, err
		}
		recs, err := csv.NewReader(f).ReadAll()
		f.Close()
		if err != nil || len(recs) == 0 {
			return written, fmt.Errorf("reading %s.csv: %v", name, err)
		}
		title := map[string]string{"files": "Reading files"}[name]
		if name == "files" && len(recs) > 1 {
			if v, ok := (&Report{Columns: recs[0]}).floats(recs[1], "files", "file_size_bytes"); ok {
				title = fmt.Sprintf("Reading %.0f MB split into N files", v[0]*v[1]/1e6)
			}
		}
		ps, err := plotters[name](&Report{Name: name, Title: title, Columns: recs[0], Rows: recs[1:]}, dir)
		if err != nil {
			return written, err
		}
		written = append(written, ps...)
	}
	return written, nil
}
