package store

import (
	"context"
	"crypto/rand"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
)

// BenchmarkSeal measures filling and sealing objects: hashing, fsync and
// the atomic rename, per object size.
func BenchmarkSeal(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20, 16 << 20} {
		b.Run(sizeName(size), func(b *testing.B) {
			s, err := Open(context.Background(), b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			data := make([]byte, size)
			b.SetBytes(int64(size))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				_, _ = rand.Read(data[:32]) // a new object each time
				d := digest.FromBytes(data)
				b.StartTimer()
				if _, err := s.Ensure(context.Background(), d, int64(size), func(_ context.Context, w io.Writer) error {
					_, err := w.Write(data)
					return err
				}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkOpenSealed measures the lookup a FUSE open of a fetched file costs.
func BenchmarkOpenSealed(b *testing.B) {
	s, err := Open(context.Background(), b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	d := digest.FromString("x")
	if _, err := s.Ensure(context.Background(), d, 1, func(_ context.Context, w io.Writer) error {
		_, err := io.WriteString(w, "x")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		h, err := s.Open(d)
		if err != nil {
			b.Fatal(err)
		}
		h.Close()
	}
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20:
		return itoa(n>>20) + "MiB"
	default:
		return itoa(n>>10) + "KiB"
	}
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}
