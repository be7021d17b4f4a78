package ptrace

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Mem reads and writes a stopped tracee's memory. It uses
// process_vm_readv/writev, which move 5+ GB/s here, and falls back to
// /proc/PID/mem for pages those refuse (PROT_NONE, read-only). Any thread
// may use it: these are not ptrace requests.
type Mem struct {
	Pid  int
	file *os.File // /proc/PID/mem, opened on first need
}

// NewMem returns a Mem for pid.
func NewMem(pid int) *Mem { return &Mem{Pid: pid} }

// Close releases /proc/PID/mem if it was opened.
func (m *Mem) Close() error {
	if m.file != nil {
		return m.file.Close()
	}
	return nil
}

func (m *Mem) procMem() (*os.File, error) {
	if m.file == nil {
		f, err := os.OpenFile("/proc/"+strconv.Itoa(m.Pid)+"/mem", os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		m.file = f
	}
	return m.file, nil
}

// Read fills buf from addr.
func (m *Mem) Read(addr uint64, buf []byte) error {
	return m.move(addr, buf, unix.ProcessVMReadv, (*os.File).ReadAt, "read")
}

// ReadFile fills buf from addr through /proc/PID/mem only. Unlike
// process_vm_readv, which pins the pages it reads (FOLL_PIN) and so makes
// the tracee's own copy of every anonymous page it still shares
// copy-on-write with another process (a fork's parent or child), it
// leaves such pages shared.
func (m *Mem) ReadFile(addr uint64, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	f, err := m.procMem()
	if err != nil {
		return fmt.Errorf("read %#x: %w", addr, err)
	}
	if _, err := f.ReadAt(buf, int64(addr)); err != nil {
		return fmt.Errorf("read %d bytes at %#x: %w", len(buf), addr, err)
	}
	return nil
}

// ReadV gathers several remote ranges into buf in one system call where
// possible. ranges are (addr, len) pairs whose lengths add up to len(buf).
func (m *Mem) ReadV(buf []byte, ranges []unix.RemoteIovec) error {
	if len(buf) == 0 {
		return nil
	}
	n, err := unix.ProcessVMReadv(m.Pid, []unix.Iovec{iovec(buf)}, ranges, 0)
	if err == nil && n == len(buf) {
		return nil
	}
	// Partial: fall back range by range.
	off := 0
	for _, r := range ranges {
		if err := m.Read(uint64(r.Base), buf[off:off+r.Len]); err != nil {
			return err
		}
		off += r.Len
	}
	return nil
}

// Write copies buf to addr.
func (m *Mem) Write(addr uint64, buf []byte) error {
	return m.move(addr, buf, unix.ProcessVMWritev, func(f *os.File, b []byte, off int64) (int, error) {
		return f.WriteAt(b, off)
	}, "write")
}

// move copies between buf and the tracee's memory at addr: through vm
// (process_vm_readv/writev) as far as it goes, then through /proc/PID/mem.
func (m *Mem) move(addr uint64, buf []byte,
	vm func(int, []unix.Iovec, []unix.RemoteIovec, uint) (int, error),
	file func(*os.File, []byte, int64) (int, error), op string) error {
	if len(buf) == 0 {
		return nil
	}
	done := 0
	for done < len(buf) {
		n, err := vm(m.Pid,
			[]unix.Iovec{iovec(buf[done:])},
			[]unix.RemoteIovec{{Base: uintptr(addr) + uintptr(done), Len: len(buf) - done}}, 0)
		if err != nil || n == 0 {
			break
		}
		done += n
	}
	if done == len(buf) {
		return nil
	}
	f, err := m.procMem()
	if err != nil {
		return fmt.Errorf("%s %#x: %w", op, addr+uint64(done), err)
	}
	if _, err := file(f, buf[done:], int64(addr)+int64(done)); err != nil {
		return fmt.Errorf("%s %d bytes at %#x: %w", op, len(buf)-done, addr+uint64(done), err)
	}
	return nil
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}
