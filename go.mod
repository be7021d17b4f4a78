module github.com/pcluster/pcluster

go 1.26.8

require (
	github.com/klauspost/compress v1.20.4
	golang.org/x/crypto v0.59.0
)

require golang.org/x/sys v0.50.0 // indirect
