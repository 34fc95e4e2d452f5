package bench

import (
	"fmt"
	"image/color"
	"math"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// linePoint is one point of a named series.
type linePoint struct {
	Series string
	X, Y   float64
}

var palette = []color.Color{
	color.RGBA{31, 119, 180, 255}, color.RGBA{255, 127, 14, 255}, color.RGBA{44, 160, 44, 255},
	color.RGBA{214, 39, 40, 255}, color.RGBA{148, 103, 189, 255}, color.RGBA{140, 86, 75, 255},
	color.RGBA{227, 119, 194, 255}, color.RGBA{127, 127, 127, 255}, color.RGBA{188, 189, 34, 255},
	color.RGBA{23, 190, 207, 255},
}

// logTicks labels powers of ten (and 2× and 5× between them when the range is small).
type logTicks struct{}

func (logTicks) Ticks(lo, hi float64) []plot.Tick {
	var ts []plot.Tick
	if lo <= 0 || hi <= 0 {
		return plot.DefaultTicks{}.Ticks(lo, hi)
	}
	few := math.Log10(hi/lo) < 2.5
	for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if v < lo*0.999 || v > hi*1.001 {
				continue
			}
			t := plot.Tick{Value: v}
			if m == 1 || few {
				t.Label = fmtNum(v)
			}
			ts = append(ts, t)
		}
	}
	return ts
}

func fmtNum(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 1:
		return fmt.Sprintf("%g", v)
	default:
		return fmt.Sprintf("%g", v)
	}
}

// linePlot draws one line with points per series, in order of first
// appearance, on log-log axes when logScale is set.
func linePlot(path, title, xlabel, ylabel string, pts []linePoint, logScale bool) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xlabel
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(10)
	p.Add(plotter.NewGrid())
	if logScale {
		p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
		p.X.Tick.Marker, p.Y.Tick.Marker = logTicks{}, logTicks{}
	}
	var order []string
	series := map[string]plotter.XYs{}
	for _, pt := range pts {
		if logScale && (pt.X <= 0 || pt.Y <= 0) {
			continue
		}
		if _, ok := series[pt.Series]; !ok {
			order = append(order, pt.Series)
		}
		series[pt.Series] = append(series[pt.Series], plotter.XY{X: pt.X, Y: pt.Y})
	}
	if logScale {
		// Explicit ranges: gonum pads a single-valued axis down to 0,
		// which a log scale cannot show.
		x0, x1, y0, y1 := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
		for _, xy := range series {
			for _, pt := range xy {
				x0, x1 = math.Min(x0, pt.X), math.Max(x1, pt.X)
				y0, y1 = math.Min(y0, pt.Y), math.Max(y1, pt.Y)
			}
		}
		if len(series) > 0 {
			p.X.Min, p.X.Max = x0/1.5, x1*1.5
			// Room above the data for the legend (top left).
			p.Y.Min, p.Y.Max = y0/1.5, y1*math.Pow(y1/y0, 0.45)*2
		}
	}
	for i, name := range order {
		xy := series[name]
		sort.Slice(xy, func(a, b int) bool { return xy[a].X < xy[b].X })
		l, s, err := plotter.NewLinePoints(xy)
		if err != nil {
			return fmt.Errorf("plotting %s: %w", name, err)
		}
		c := palette[i%len(palette)]
		l.Color, s.Color = c, c
		l.Width = vg.Points(1.5)
		l.Dashes = dashes(i / len(palette))
		s.Shape = shapes[i%len(shapes)]
		s.Radius = vg.Points(3)
		p.Add(l, s)
		p.Legend.Add(name, l, s)
	}
	return save(p, path)
}

var shapes = []draw.GlyphDrawer{draw.CircleGlyph{}, draw.SquareGlyph{}, draw.TriangleGlyph{}, draw.CrossGlyph{}, draw.PlusGlyph{}, draw.RingGlyph{}, draw.BoxGlyph{}, draw.PyramidGlyph{}}

func dashes(i int) []vg.Length {
	if i == 0 {
		return nil
	}
	return []vg.Length{vg.Points(4), vg.Points(2)}
}

// bar is one bar with a min–max range.
type bar struct {
	Label          string
	Mean, Min, Max float64
}

// dotPlot draws one point per labelled row (the mean) with a min–max
// error bar, on a log value axis when logScale is set.
func dotPlot(path, title, ylabel string, bars []bar, logScale bool) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Add(plotter.NewGrid())
	if logScale {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = logTicks{}
	}
	var names []string
	for i, b := range bars {
		names = append(names, b.Label)
		if logScale && (b.Min <= 0 || b.Mean <= 0) {
			continue
		}
		pt := plotter.XYs{{X: float64(i), Y: b.Mean}}
		s, err := plotter.NewScatter(pt)
		if err != nil {
			return fmt.Errorf("plotting %s: %w", b.Label, err)
		}
		c := palette[i%len(palette)]
		s.Color = c
		s.Shape = draw.CircleGlyph{}
		s.Radius = vg.Points(5)
		p.Add(s)
		eb, err := plotter.NewYErrorBars(errPoint{X: float64(i), Y: b.Mean, Low: b.Mean - b.Min, High: b.Max - b.Mean})
		if err == nil {
			eb.LineStyle.Width = vg.Points(1.5)
			eb.LineStyle.Color = c
			eb.CapWidth = vg.Points(10)
			p.Add(eb)
		}
		p.Legend.Add(fmt.Sprintf("%s: mean %.3gs (min %.3g, max %.3g)", b.Label, b.Mean, b.Min, b.Max), s)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	if logScale {
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, b := range bars {
			if b.Min > 0 {
				lo, hi = math.Min(lo, b.Min), math.Max(hi, b.Max)
			}
		}
		if hi > 0 {
			p.Y.Min, p.Y.Max = lo/1.5, hi*6 // room for the legend
		}
	}
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.5, float64(len(bars))-0.5
	return save(p, path)
}

// errPoint is one point with an asymmetric vertical error.
type errPoint struct{ X, Y, Low, High float64 }

func (e errPoint) Len() int                      { return 1 }
func (e errPoint) XY(int) (float64, float64)     { return e.X, e.Y }
func (e errPoint) YError(int) (float64, float64) { return e.Low, e.High }

func save(p *plot.Plot, path string) error {
	if err := p.Save(9*vg.Inch, 5.5*vg.Inch, path); err != nil {
		return fmt.Errorf("writing plot %s: %w", path, err)
	}
	return nil
}
