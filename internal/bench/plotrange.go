package bench

import (
	"fmt"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// rangePlot draws one point per labelled row at its center value (the
// statistic named center, e.g. "median", carried in bar.Mean) with a
// min–max error bar, on a linear value axis from zero.
func rangePlot(path, title, ylabel, center string, bars []bar) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Add(plotter.NewGrid())
	var names []string
	hi := 0.0
	for i, b := range bars {
		names = append(names, b.Label)
		s, err := plotter.NewScatter(plotter.XYs{{X: float64(i), Y: b.Mean}})
		if err != nil {
			return fmt.Errorf("plotting %s: %w", b.Label, err)
		}
		c := palette[i%len(palette)]
		s.Color = c
		s.Shape = draw.CircleGlyph{}
		s.Radius = vg.Points(5)
		p.Add(s)
		if eb, err := plotter.NewYErrorBars(errPoint{X: float64(i), Y: b.Mean, Low: b.Mean - b.Min, High: b.Max - b.Mean}); err == nil {
			eb.LineStyle.Width = vg.Points(1.5)
			eb.LineStyle.Color = c
			eb.CapWidth = vg.Points(10)
			p.Add(eb)
		}
		p.Legend.Add(fmt.Sprintf("%s: %s %.3gs (min %.3g, max %.3g)", b.Label, center, b.Mean, b.Min, b.Max), s)
		hi = max(hi, b.Max)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Y.Min, p.Y.Max = 0, hi*1.6 // room for the legend
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.5, float64(len(bars))-0.5
	return save(p, path)
}
